# ruff: noqa: E501  (a one-off study whose table headers are long lines)
"""Open-set / semi-supervised measurement study on vehicles6 with frozen tf_efficientnet_lite0 features.

One-off research script (not part of the package). Step 1 caches pooled features to
/tmp/v6_feats.npz; step 2 works on the cache only: open-set scores, pseudo-label selection,
unknown-class discovery by clustering, and active-learning selection, over seeds 0, 1, 2.
Tables go to stdout and /tmp/openset_research.txt.

    .venv/bin/python bench/openset_research.py [--holdouts juggernaut,minibus pickup,truck]
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import numpy as np

SHARED = Path(__file__).resolve().parents[2] / "shared"
DATA = SHARED / "datasets" / "vehicles6"
WEIGHTS = SHARED / "weights" / "tf_efficientnet_lite0.in1k.safetensors"
CACHE = Path("/tmp/v6_feats.npz")
REPORT = Path("/tmp/openset_research.txt")
CLASSES = ["bike", "car", "juggernaut", "minibus", "pickup", "truck"]
SEEDS = (0, 1, 2)
LS = (20, 50)
KS = (1, 3, 5, 10)
C_GRID = (0.01, 0.1, 1.0, 10.0, 100.0, 1000.0)
N_VAL = N_TEST = N_UNK_TEST = 100

LINES: list[str] = []


def out(s: str = "") -> None:
    print(s, flush=True)
    LINES.append(s)


# ----------------------------------------------------------------------------- step 1
def extract() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if CACHE.exists():
        z = np.load(CACHE, allow_pickle=False)
        out(f"[extract] reusing {CACHE}: features {z['features'].shape}")
        return z["features"], z["labels"], z["paths"]
    import timm
    import torch
    from PIL import Image
    from safetensors.torch import load_file

    torch.set_num_threads(2)
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0)
    sd = {k: v for k, v in load_file(str(WEIGHTS)).items() if not k.startswith("classifier.")}
    res = model.load_state_dict(sd, strict=False)
    missing = [k for k in res.missing_keys if not k.startswith("classifier.")]
    assert not missing and not res.unexpected_keys, (missing, res.unexpected_keys)
    model.eval()
    cfg = timm.data.resolve_data_config({}, model=model)
    tf = timm.data.create_transform(**cfg)
    out(f"[extract] data config {cfg}")
    paths, labels = [], []
    for ci, c in enumerate(CLASSES):
        files = sorted(p for p in (DATA / c).iterdir() if p.suffix.lower() in (".jpg", ".jpeg"))
        paths += [str(p) for p in files]
        labels += [ci] * len(files)
    feats = []
    t0 = time.perf_counter()
    t_fwd = 0.0
    with torch.inference_mode():
        for i in range(0, len(paths), 32):
            x = torch.stack([tf(Image.open(p).convert("RGB")) for p in paths[i : i + 32]])
            t1 = time.perf_counter()
            feats.append(model(x).numpy().astype(np.float32))
            t_fwd += time.perf_counter() - t1
    dt = time.perf_counter() - t0
    f = np.concatenate(feats)
    out(
        f"[extract] {len(paths)} images in {dt:.1f}s: {len(paths) / dt:.1f} img/s end to end, "
        f"{len(paths) / t_fwd:.1f} img/s forward only (batch 32, 2 threads); features {f.shape}"
    )
    np.savez(CACHE, features=f, labels=np.array(labels), paths=np.array(paths))
    return f, np.array(labels), np.array(paths)


# ----------------------------------------------------------------------------- helpers
def l2n(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def ms(v) -> str:
    v = np.asarray(v, dtype=float)
    return f"{v.mean():.3f}±{v.std():.3f}"


def msi(v) -> str:
    v = np.asarray(v, dtype=float)
    return f"{v.mean():.1f}±{v.std():.1f}"


def table(header: list[str], rows: list[list[str]]) -> None:
    w = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    out("  ".join(str(h).ljust(w[i]) for i, h in enumerate(header)))
    for r in rows:
        out("  ".join(str(x).ljust(w[i]) for i, x in enumerate(r)))


class Probe:
    def __init__(self, variant: str, C: float):
        self.variant, self.C = variant, C

    def _t(self, X):
        if self.variant == "std":
            return self.sc.transform(X)
        return l2n(X)

    def fit(self, X, y):
        from sklearn.linear_model import LogisticRegression
        from sklearn.preprocessing import StandardScaler

        if self.variant == "std":
            self.sc = StandardScaler().fit(X)
        self.lr = LogisticRegression(C=self.C, max_iter=2000).fit(self._t(X), y)
        return self

    def logits(self, X):
        return self.lr.decision_function(self._t(X))

    def proba(self, X):
        return self.lr.predict_proba(self._t(X))

    def acc(self, X, y):
        return float((self.lr.predict(self._t(X)) == y).mean())


def cv_C(variant, X, y, seed):
    from sklearn.model_selection import StratifiedKFold

    skf = StratifiedKFold(5, shuffle=True, random_state=seed)
    best = None
    for C in C_GRID:
        accs, lls = [], []
        for a, b in skf.split(X, y):
            p = Probe(variant, C).fit(X[a], y[a])
            pr = p.proba(X[b])
            accs.append((pr.argmax(1) == y[b]).mean())
            lls.append(-np.log(np.clip(pr[np.arange(len(b)), y[b]], 1e-12, 1)).mean())
        key = (np.mean(accs), -np.mean(lls))
        if best is None or key > best[0]:
            best = (key, C)
    return best[1]


def auroc(sk, su):
    from sklearn.metrics import roc_auc_score

    return roc_auc_score(np.r_[np.ones(len(sk)), np.zeros(len(su))], np.r_[sk, su])


def fpr95(sk, su):
    return float((su >= np.quantile(sk, 0.05)).mean())


def knn_scores(Q, R, ks=KS):
    """cosine similarity to the k-th nearest reference (Q, R already L2-normalised)."""
    S = np.sort(Q @ R.T, axis=1)[:, ::-1]
    return {k: S[:, k - 1] for k in ks}


def make_split(labels, known, unknown, L, seed):
    """test/val are the same for every L at one seed; train at L=20 is a subset of train at L=50."""
    rng = np.random.default_rng(seed)
    tr, va, te, pool, ute = [], [], [], [], []
    for c in known:
        idx = rng.permutation(np.where(labels == c)[0])
        te += list(idx[:N_TEST])
        va += list(idx[N_TEST : N_TEST + N_VAL])
        tr += list(idx[N_TEST + N_VAL : N_TEST + N_VAL + L])
        pool += list(idx[N_TEST + N_VAL + L :])
    for c in unknown:
        idx = rng.permutation(np.where(labels == c)[0])
        ute += list(idx[:N_UNK_TEST])
        pool += list(idx[N_UNK_TEST:])
    return {k: np.array(v) for k, v in dict(tr=tr, va=va, te=te, pool=pool, ute=ute).items()}


# ----------------------------------------------------------------------------- study
def run_holdout(F, labels, unknown_names, args):
    unknown = [CLASSES.index(u) for u in unknown_names]
    known = [c for c in range(len(CLASSES)) if c not in unknown]
    kmap = -np.ones(len(CLASSES), dtype=int)
    kmap[known] = np.arange(len(known))
    Y = kmap[labels]  # -1 = unknown class
    FN = l2n(F)
    tag = "+".join(unknown_names)
    out("")
    out("=" * 100)
    out(f"HOLD-OUT unknown = {tag}; known = {[CLASSES[c] for c in known]}")
    out("=" * 100)

    # ---------------- a0) probe variant and C
    t0 = time.perf_counter()
    cfgs = {}
    rows = []
    res0 = {}
    for L in LS:
        for seed in SEEDS:
            sp = make_split(labels, known, unknown, L, seed)
            cfgs[(L, seed)] = sp
            for variant in ("std", "l2"):
                Ccv = cv_C(variant, F[sp["tr"]], Y[sp["tr"]], seed)
                for cmode, C in (("C=1", 1.0), ("C=cv", Ccv)):
                    p = Probe(variant, C).fit(F[sp["tr"]], Y[sp["tr"]])
                    acc = p.acc(F[sp["te"]], Y[sp["te"]])
                    msp_k = p.proba(F[sp["te"]]).max(1)
                    msp_u = p.proba(F[sp["ute"]]).max(1)
                    res0.setdefault((L, variant, cmode), []).append((acc, auroc(msp_k, msp_u), C))
    for (L, variant, cmode), v in res0.items():
        v = np.array(v)
        rows.append(
            [
                L,
                variant,
                cmode,
                ms(v[:, 0]),
                ms(v[:, 1]),
                ",".join(f"{c:g}" for c in v[:, 2]) if cmode == "C=cv" else "1",
            ]
        )
    out(
        "\n(a0) probe variant: known test accuracy and MSP AUROC  (std = StandardScaler fit on labelled; l2 = L2-normalised)"
    )
    table(["L", "feat", "C", "test_acc", "MSP_AUROC", "C per seed"], rows)
    # pick the variant with the best mean accuracy over both L
    best_key = max(
        {(v, c) for (_, v, c) in res0},
        key=lambda vc: np.mean([np.mean([r[0] for r in res0[(L, *vc)]]) for L in LS]),
    )
    out(
        f"-> using probe feat={best_key[0]} {best_key[1]} for everything below   [{time.perf_counter() - t0:.0f}s]"
    )

    # teachers and scores per (L, seed)
    T = {}
    for L in LS:
        for seed in SEEDS:
            sp = cfgs[(L, seed)]
            C = 1.0 if best_key[1] == "C=1" else cv_C(best_key[0], F[sp["tr"]], Y[sp["tr"]], seed)
            p = Probe(best_key[0], C).fit(F[sp["tr"]], Y[sp["tr"]])
            R = FN[sp["tr"]]
            d = {"probe": p, "C": C, "teacher_acc": p.acc(F[sp["te"]], Y[sp["te"]])}
            for part in ("va", "te", "ute", "pool", "tr"):
                lg = p.logits(F[sp[part]])
                pr = p.proba(F[sp[part]])
                sc = {"MSP": pr.max(1), "energy": np.logaddexp.reduce(lg, axis=1)}
                if part == "tr":  # leave-one-out kNN for train is not needed; skip
                    sc.update({f"kNN{k}": np.full(len(pr), np.nan) for k in KS})
                else:
                    sc.update({f"kNN{k}": v for k, v in knn_scores(FN[sp[part]], R).items()})
                d[part] = {"proba": pr, "scores": sc}
            # combinations: rank average within everything scored (val+test+pool), z-sum by val stats
            parts = ("va", "te", "ute", "pool")
            sizes = [len(sp[q]) for q in parts]
            for k in KS:
                from scipy.stats import rankdata

                cat = {
                    s: np.concatenate([d[q]["scores"][s] for q in parts])
                    for s in ("MSP", f"kNN{k}")
                }
                rk = (rankdata(cat["MSP"]) + rankdata(cat[f"kNN{k}"])) / 2
                zs = sum(
                    (cat[s] - d["va"]["scores"][s].mean()) / d["va"]["scores"][s].std() for s in cat
                )
                for name, v in ((f"rank(kNN{k}+MSP)", rk), (f"z(kNN{k}+MSP)", zs)):
                    for q, piece in zip(parts, np.split(v, np.cumsum(sizes)[:-1]), strict=False):
                        d[q]["scores"][name] = piece
            # kNN1 + energy (energy was the strongest single score on one hold-out)
            cat = {
                s: np.concatenate([d[q]["scores"][s] for q in parts]) for s in ("energy", "kNN1")
            }
            rk = (rankdata(cat["energy"]) + rankdata(cat["kNN1"])) / 2
            zs = sum(
                (cat[s] - d["va"]["scores"][s].mean()) / d["va"]["scores"][s].std() for s in cat
            )
            for name, v in (("rank(kNN1+energy)", rk), ("z(kNN1+energy)", zs)):
                for q, piece in zip(parts, np.split(v, np.cumsum(sizes)[:-1]), strict=False):
                    d[q]["scores"][name] = piece
            T[(L, seed)] = d

    # ---------------- a) open-set scores
    score_names = (
        ["MSP", "energy"]
        + [f"kNN{k}" for k in KS]
        + [f"rank(kNN{k}+MSP)" for k in KS]
        + [f"z(kNN{k}+MSP)" for k in KS]
        + ["rank(kNN1+energy)", "z(kNN1+energy)"]
    )
    out(
        "\n(a) open-set detection, known test (400) vs unknown test (200); thr = 5th pct of known VAL score"
    )
    auc_mean = {}
    for L in LS:
        rows = []
        for s in score_names:
            A, Fp, K, U = [], [], [], []
            for seed in SEEDS:
                d = T[(L, seed)]
                sk, su, sv = d["te"]["scores"][s], d["ute"]["scores"][s], d["va"]["scores"][s]
                thr = np.quantile(sv, 0.05)
                A.append(auroc(sk, su))
                Fp.append(fpr95(sk, su))
                K.append((sk >= thr).mean())
                U.append((su < thr).mean())
            auc_mean[(L, s)] = np.mean(A)
            rows.append([s, ms(A), ms(Fp), ms(K), ms(U)])
        out(f"L={L}  teacher test acc {ms([T[(L, s)]['teacher_acc'] for s in SEEDS])}")
        table(
            [
                "score",
                "AUROC",
                "FPR@95TPR",
                "known_test_kept@valthr",
                "unknown_test_rejected@valthr",
            ],
            rows,
        )
    best_k = max(KS, key=lambda k: np.mean([auc_mean[(L, f"kNN{k}")] for L in LS]))
    kname = f"kNN{best_k}"
    out(f"-> best plain kNN k (mean AUROC over L) = {best_k}; used as the unknown filter below")

    # flag pool as unknown with the kNN filter
    for _key, d in T.items():
        thr = np.quantile(d["va"]["scores"][kname], 0.05)
        d["flag"] = d["pool"]["scores"][kname] < thr
    # ---------------- b) pseudo-labelling
    t0 = time.perf_counter()
    strategies = (
        ["all", "fixed0.9", "fixed0.9+cap2L"]
        + [f"trainq{q}" for q in (10, 20, 50)]
        + ["trainq20+cap2L"]
        + [f"valq{q}" for q in (10, 20, 50)]
        + ["valq20+cap2L"]
        + [f"top{r}L" for r in (1, 2, 5)]
        + ["noOOD:fixed0.9", "noOOD:top2L", "noOOD:all"]
    )

    def select(strategy, d, sp, L, teacher):
        pr = d["pool_proba"]
        pred, conf = pr.argmax(1), pr.max(1)
        ood = not strategy.startswith("noOOD:")
        s = strategy.split(":")[-1]
        allowed = ~d["flag"] if ood else np.ones(len(pred), bool)
        cap = s.endswith("+cap2L")
        s = s.replace("+cap2L", "")
        keep = np.zeros(len(pred), bool)
        for c in range(len(known)):
            m = allowed & (pred == c)
            if s == "all":
                km = m
            elif s.startswith("fixed"):
                km = m & (conf >= float(s[5:]))
            elif s.startswith("trainq") or s.startswith("valq"):
                part = "tr" if s.startswith("train") else "va"
                q = float(s[6:] if part == "tr" else s[4:])
                ptr = teacher.proba(F[sp[part]])
                ok = (ptr.argmax(1) == c) & (Y[sp[part]] == c)
                thr = np.percentile(ptr[ok, c], q) if ok.any() else 1.0
                km = m & (conf >= thr)
            elif s.startswith("top"):
                n = int(s[3:-1]) * L
                idx = np.where(m)[0]
                km = np.zeros_like(m)
                km[idx[np.argsort(-conf[idx])[:n]]] = True
            if cap and km.sum() > 2 * L:
                idx = np.where(km)[0]
                km = np.zeros_like(m)
                km[idx[np.argsort(-conf[idx])[: 2 * L]]] = True
            keep |= km
        return np.where(keep)[0], pred

    def pl_round(strategy, d, sp, L, teacher):
        d["pool_proba"] = teacher.proba(F[sp["pool"]])
        sel, pred = select(strategy, d, sp, L, teacher)
        Xs = np.concatenate([F[sp["tr"]], F[sp["pool"][sel]]])
        ys = np.concatenate([Y[sp["tr"]], pred[sel]])
        st = Probe(best_key[0], d["C"]).fit(Xs, ys)
        true = Y[sp["pool"][sel]]
        kn = true >= 0
        return st, dict(
            n=len(sel),
            leak=int((~kn).sum()),
            pl_acc=float((pred[sel][kn] == true[kn]).mean()) if kn.any() else np.nan,
            acc=st.acc(F[sp["te"]], Y[sp["te"]]),
        )

    out(
        f"\n(b) pseudo-labelling (OOD filter = {kname} < 95%-TPR val threshold; hard labels; student = same probe)"
    )
    pool_info = []
    for L in LS:
        for seed in SEEDS:
            d, sp = T[(L, seed)], cfgs[(L, seed)]
            unk = Y[sp["pool"]] < 0
            pool_info.append(
                (L, len(sp["pool"]), unk.sum(), d["flag"][unk].mean(), d["flag"][~unk].mean())
            )
    for L in LS:
        pi = np.array([p[1:] for p in pool_info if p[0] == L], dtype=float)
        out(
            f"L={L}: pool {pi[0, 0]:.0f} images ({pi[0, 1]:.0f} unknown); filter flags "
            f"{ms(pi[:, 2])} of unknown pool, {ms(pi[:, 3])} of known pool"
        )
    R1 = {}
    for L in LS:
        for seed in SEEDS:
            d, sp = T[(L, seed)], cfgs[(L, seed)]
            for s in strategies:
                R1[(L, seed, s)] = pl_round(s, d, sp, L, d["probe"])[1]
    gain_mean = {}
    for L in LS:
        rows = []
        for s in strategies:
            rs = [R1[(L, seed, s)] for seed in SEEDS]
            g = [r["acc"] - T[(L, seed)]["teacher_acc"] for r, seed in zip(rs, SEEDS, strict=False)]
            gain_mean[(L, s)] = np.mean(g)
            rows.append(
                [
                    s,
                    msi([r["n"] for r in rs]),
                    msi([r["leak"] for r in rs]),
                    ms([r["pl_acc"] for r in rs]),
                    ms([r["acc"] for r in rs]),
                    f"{np.mean(g) * 100:+.2f}",
                ]
            )
        out(f"L={L}  teacher test acc {ms([T[(L, s)]['teacher_acc'] for s in SEEDS])}")
        table(
            ["strategy", "n_pseudo", "unk_leaked", "pseudo_acc(known)", "student_acc", "gain_pts"],
            rows,
        )
    ranked = sorted(strategies, key=lambda s: -np.mean([gain_mean[(L, s)] for L in LS]))
    top = [s for s in ranked if not s.startswith("noOOD")][:3]
    out(f"-> round-1 ranking by mean gain over L: {ranked[:6]}")
    rows = []
    for s in top:
        for L in LS:
            g1, g2, leaks, ns = [], [], [], []
            for seed in SEEDS:
                d, sp = T[(L, seed)], cfgs[(L, seed)]
                st, r1 = pl_round(s, d, sp, L, d["probe"])
                _st2, r2 = pl_round(s, d, sp, L, st)
                g1.append(r1["acc"] - d["teacher_acc"])
                g2.append(r2["acc"] - d["teacher_acc"])
                leaks.append(r2["leak"])
                ns.append(r2["n"])
            rows.append(
                [
                    s,
                    L,
                    f"{np.mean(g1) * 100:+.2f}",
                    f"{np.mean(g2) * 100:+.2f}±{np.std(g2) * 100:.2f}",
                    msi(ns),
                    msi(leaks),
                ]
            )
    out(
        "two rounds (round 2 teacher = round-1 student, re-labels the whole pool, OOD filter fixed):"
    )
    table(["strategy", "L", "gain_r1_pts", "gain_r2_pts", "n_pseudo_r2", "unk_leaked_r2"], rows)
    out(f"[b took {time.perf_counter() - t0:.0f}s]")

    # ---------------- c) discovery
    t0 = time.perf_counter()
    from sklearn.cluster import AgglomerativeClustering, KMeans
    from sklearn.decomposition import PCA
    from sklearn.metrics import adjusted_rand_score as ari
    from sklearn.metrics import pairwise_distances, silhouette_score

    out("\n(c) discovery: cluster pool images flagged unknown; k by silhouette over 2..10")

    def cluster(method, X, k, seed):
        if method == "kmeans":
            return KMeans(k, n_init=4, random_state=seed).fit_predict(X)
        if method == "agg-ward":
            return AgglomerativeClustering(k, linkage="ward").fit_predict(X)
        return AgglomerativeClustering(k, linkage="average", metric="cosine").fit_predict(X)

    C_rows = {}
    comp = []
    for L in LS:
        for seed in SEEDS:
            d, sp = T[(L, seed)], cfgs[(L, seed)]
            idx = sp["pool"][d["flag"]]
            lab = labels[idx]
            unk = Y[idx] < 0
            comp.append((L, len(idx), unk.mean(), unk.sum() / (Y[sp["pool"]] < 0).sum()))
            Xb = FN[idx]
            for space in ("l2", "pca64"):
                X = Xb if space == "l2" else l2n(PCA(64, random_state=seed).fit_transform(Xb))
                D = pairwise_distances(X)
                Dc = pairwise_distances(X, metric="cosine")
                for method in ("kmeans", "agg-ward", "agg-avgcos"):
                    sil, preds = [], {}
                    for k in range(2, 11):
                        preds[k] = cluster(method, X, k, seed)
                        sil.append(
                            silhouette_score(
                                Dc if method == "agg-avgcos" else D, preds[k], metric="precomputed"
                            )
                        )
                    kb = 2 + int(np.argmax(sil))
                    row = dict(
                        k=kb,
                        ari=ari(lab, preds[kb]),
                        ari_unk=ari(lab[unk], preds[kb][unk]),
                        ari2_unk=ari(lab[unk], preds[2][unk]),
                        best_ari=max(ari(lab, preds[k]) for k in preds),
                        best_k=max(preds, key=lambda k: ari(lab, preds[k])),
                    )
                    C_rows.setdefault((L, space, method), []).append(row)
    for L in LS:
        cp = np.array([c[1:] for c in comp if c[0] == L])
        out(
            f"L={L}: flagged {msi(cp[:, 0])} images, of which unknown-class share {ms(cp[:, 1])}; "
            f"unknown-pool recall {ms(cp[:, 2])}"
        )
        rows = []
        for space in ("l2", "pca64"):
            for method in ("kmeans", "agg-ward", "agg-avgcos"):
                rs = C_rows[(L, space, method)]
                rows.append(
                    [
                        space,
                        method,
                        ",".join(str(r["k"]) for r in rs),
                        ms([r["ari"] for r in rs]),
                        ms([r["ari_unk"] for r in rs]),
                        ms([r["ari2_unk"] for r in rs]),
                        ms([r["best_ari"] for r in rs])
                        + " (k="
                        + ",".join(str(r["best_k"]) for r in rs)
                        + ")",
                    ]
                )
        table(
            [
                "space",
                "method",
                "sil_k/seed",
                "ARI_all@silk",
                "ARI_heldout@silk",
                "ARI_heldout@k=2",
                "oracle_best_ARI_all",
            ],
            rows,
        )
    out(f"[c took {time.perf_counter() - t0:.0f}s]")

    # ---------------- d) active learning
    t0 = time.perf_counter()
    B = 60
    out(
        f"\n(d) active learning, budget {B} from the pool; picked unknown-class images are wasted (dropped)"
    )

    def pick(strategy, d, sp, L, seed):
        pool = sp["pool"]
        cand = np.arange(len(pool))
        if strategy.endswith("+filter"):
            cand = cand[~d["flag"]]
        s = strategy.replace("+filter", "")
        pr = d["probe"].proba(F[pool[cand]])
        ps = np.sort(pr, axis=1)
        margin = ps[:, -1] - ps[:, -2]
        if s == "random":
            return cand[np.random.default_rng(1000 + seed).choice(len(cand), B, replace=False)]
        if s == "margin":
            return cand[np.argsort(margin)[:B]]
        if s == "margin+div":
            cl = KMeans(B, n_init=1, random_state=seed).fit_predict(FN[pool[cand]])
            return np.array(
                [cand[np.where(cl == c)[0][np.argmin(margin[cl == c])]] for c in range(B)]
            )
        if s == "kcenter":
            X = FN[pool[cand]]
            dist = 1 - (X @ FN[sp["tr"]].T).max(1)
            chosen = []
            for _ in range(B):
                j = int(np.argmax(dist))
                chosen.append(j)
                dist = np.minimum(dist, 1 - X @ X[j])
            return cand[np.array(chosen)]
        raise ValueError(s)

    al = ["random", "margin", "margin+div", "kcenter"]
    al = al + [a + "+filter" for a in al]
    for L in (20,) if not args.al_both else LS:
        rows = []
        for s in al:
            accs, wasted, gains = [], [], []
            for seed in SEEDS:
                d, sp = T[(L, seed)], cfgs[(L, seed)]
                sel = sp["pool"][pick(s, d, sp, L, seed)]
                sel = sel[Y[sel] >= 0]
                wasted.append(B - len(sel))
                idx = np.concatenate([sp["tr"], sel])
                a = Probe(best_key[0], d["C"]).fit(F[idx], Y[idx]).acc(F[sp["te"]], Y[sp["te"]])
                accs.append(a)
                gains.append(a - d["teacher_acc"])
            rows.append(
                [s, msi(wasted), ms(accs), f"{np.mean(gains) * 100:+.2f}±{np.std(gains) * 100:.2f}"]
            )
        out(f"L={L}  teacher test acc {ms([T[(L, s)]['teacher_acc'] for s in SEEDS])}")
        table(["strategy", "wasted(unknown)", "test_acc", "gain_pts"], rows)
    out(f"[d took {time.perf_counter() - t0:.0f}s]")


def silhouette_sanity(F, labels):
    """Does silhouette over 2..10 find the true k when it is not 2? (all test-free, labels only for ARI)"""
    from sklearn.cluster import AgglomerativeClustering, KMeans
    from sklearn.metrics import adjusted_rand_score as ari
    from sklearn.metrics import pairwise_distances, silhouette_score

    out(
        "\n(c2) k-selection sanity: silhouette over 2..10 on L2-normalised features of whole classes (400/class, seed 0)"
    )
    rng = np.random.default_rng(0)
    rows = []
    for names in (
        ["juggernaut", "minibus"],
        ["pickup", "truck"],
        ["juggernaut", "minibus", "truck"],
        ["bike", "car", "juggernaut", "minibus"],
        CLASSES,
    ):
        idx = np.concatenate(
            [rng.permutation(np.where(labels == CLASSES.index(c))[0])[:400] for c in names]
        )
        X, lab = l2n(F[idx]), labels[idx]
        D = pairwise_distances(X)
        for method in ("kmeans", "agg-ward"):
            preds, sil = {}, []
            for k in range(2, 11):
                preds[k] = (
                    KMeans(k, n_init=4, random_state=0).fit_predict(X)
                    if method == "kmeans"
                    else AgglomerativeClustering(k, linkage="ward").fit_predict(X)
                )
                sil.append(silhouette_score(D, preds[k], metric="precomputed"))
            kb = 2 + int(np.argmax(sil))
            rows.append(
                [
                    "+".join(names),
                    len(names),
                    method,
                    kb,
                    f"{ari(lab, preds[kb]):.3f}",
                    f"{ari(lab, preds[len(names)]):.3f}",
                    " ".join(f"{v:.3f}" for v in sil[:5]),
                ]
            )
    table(
        ["classes", "true_k", "method", "sil_k", "ARI@sil_k", "ARI@true_k", "silhouette k=2..6"],
        rows,
    )


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--holdouts", nargs="+", default=["juggernaut,minibus", "pickup,truck"])
    ap.add_argument("--al-both", action="store_true", help="active learning at L=50 too")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(2)
    warnings.filterwarnings("ignore", category=FutureWarning)
    t0 = time.perf_counter()
    F, labels, _ = extract()
    for h in args.holdouts:
        run_holdout(F, labels, h.split(","), args)
        REPORT.write_text("\n".join(LINES) + "\n")
    silhouette_sanity(F, labels)
    out(f"\n[total step-2 time {time.perf_counter() - t0:.0f}s]")
    REPORT.write_text("\n".join(LINES) + "\n")


if __name__ == "__main__":
    main()
