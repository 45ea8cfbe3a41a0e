#!/usr/bin/env bash
# The floor of pyproject.toml's torch range, tested. Installs vision_tl (a wheel built from
# this checkout, not editable) with the lowest torch + torchvision pair pyproject.toml allows
# into a throwaway venv, then
#   (a) imports every vision_tl module from that install;
#   (b) trains 1 epoch on the CPU (built-in `shapes` data, 32 px, ResNet18 from scratch) and
#       evaluates best.ckpt on val: eval's acc must equal training's best_val_acc (to 1e-6);
#   (c) exports best.ckpt to ONNX (torch.onnx.export's default dynamo exporter, the reason for
#       the floor) and checks the file's logits under onnxruntime against PyTorch's (1e-4).
# Exits non-zero on the first failure. Needs the package index: pip resolves the whole
# project again, torch's CUDA libraries included (the index has no CPU-only pair): about
# 4 GB downloaded, a 7.8 GB venv, 12 GB at the peak of the install, all under $TMPDIR and
# removed at exit (KEEP=1 keeps it); ~4.5 min on 2 cores (2.3 of them installing).
# Run by hand or from the slow tier (VISION_TL_LOWEST_TORCH=1 pytest tests/test_torch_range.py).
#
#   tests/compat/lowest_torch.sh                  # the pair named by pyproject.toml's floors
#   tests/compat/lowest_torch.sh 2.10.0 0.25.0    # any other pair
#   PYTHON=python3.10 tests/compat/lowest_torch.sh
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
floor() { sed -nE "s/^ *\"$1>=([0-9][0-9.]*).*/\1/p" "$repo/pyproject.toml"; }
torch_version=${1:-$(floor torch)}
vision_version=${2:-$(floor torchvision)}
python=${PYTHON:-python3}
if [[ -z $torch_version || -z $vision_version ]]; then
    echo "lowest_torch: no \"torch>=...\" / \"torchvision>=...\" floor in pyproject.toml" >&2
    exit 2
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/vision_tl_lowest_torch.XXXXXX")
venv=$work/venv
py=$venv/bin/python
finish() {
    local rc=$?
    echo
    echo "== disk: $(du -sm "$work" | cut -f1) MB in $work ($(du -sm "$venv" 2>/dev/null | cut -f1) MB the venv)"
    if [[ ${KEEP:-0} == 1 ]]; then echo "== kept $work"; else rm -rf "$work"; fi
    if ((rc == 0)); then
        echo "== lowest_torch: OK, torch $torch_version + torchvision $vision_version in ${SECONDS}s"
    else
        echo "== lowest_torch: FAILED (exit $rc) after ${SECONDS}s" >&2
    fi
}
trap finish EXIT
step() { printf '\n== [%4ds] %s\n' "$SECONDS" "$*"; }
# Run a command with its output in $work/<name>.log; on failure show the log's end.
logged() {
    local name=$1
    shift
    if ! "$@" >"$work/$name.log" 2>&1; then
        tail -n 60 "$work/$name.log" >&2
        echo "lowest_torch: $name failed (log above: $work/$name.log, KEEP=1 keeps it)" >&2
        return 1
    fi
}

# Nothing from the caller's environment may stand in for the install under test (PYTHONPATH=src,
# a user site), and nothing is written outside $work (generated data, weights caches).
unset PYTHONPATH PYTHONHOME
export PYTHONNOUSERSITE=1 PIP_NO_INPUT=1 MPLBACKEND=Agg
export VISION_TL_CACHE=$work/cache TORCH_HOME=$work/torch_home HF_HOME=$work/hf
cd "$work"

step "venv ($("$python" --version 2>&1)), vision_tl from $repo with torch==$torch_version torchvision==$vision_version"
"$python" -m venv "$venv"
logged pip-upgrade "$py" -m pip install --no-cache-dir --upgrade pip
# One resolve for the pair and the project, so every other requirement (lightning, timm, the
# onnx stack, grad-cam...) must accept the pair. No cache: everything stays in $work.
logged pip-install "$py" -m pip install --no-cache-dir \
    "torch==$torch_version" "torchvision==$vision_version" "$repo"
logged pip-check "$py" -m pip check
"$py" - "$torch_version" "$vision_version" <<'EOF'
import sys

import torch
import torchvision
from packaging.version import Version

import vision_tl

got = (torch.__version__, torchvision.__version__)
print(f"torch {got[0]} (CUDA {torch.version.cuda}), torchvision {got[1]}; vision_tl from {vision_tl.__file__}")
# "2.9" asks for 2.9.0; a local label (+cu128, +cpu) names the build, not the release.
if [Version(Version(v).public) for v in got] != [Version(v) for v in sys.argv[1:]]:
    sys.exit(f"installed {got}, asked for {tuple(sys.argv[1:])}")
if not vision_tl.__file__.startswith(sys.prefix):
    sys.exit("vision_tl is not imported from the venv under test")
EOF
export HF_HUB_OFFLINE=1  # from here on nothing is downloaded (model.pretrained=false)

step "(a) import every vision_tl module"
"$py" - <<'EOF'
import importlib
import pkgutil
import sys
import traceback

import vision_tl

failed = []


def record(name):
    failed.append(name)
    traceback.print_exc()


names = sorted(m.name for m in pkgutil.walk_packages(vision_tl.__path__, "vision_tl.", record))
for name in names:
    try:
        importlib.import_module(name)
    except Exception:
        record(name)
print(f"imported {len(names) - len(failed)} of {len(names)} modules" + (f"; failed: {failed}" if failed else ""))
sys.exit(1 if failed else 0)
EOF

step "(b) train 1 epoch on the CPU"
logged train "$py" -m vision_tl.train trainer.accelerator=cpu trainer.max_epochs=1 \
    data.num_workers=0 data.image_size=32 model.pretrained=false hydra.run.dir="$work/run"
grep -h "best val acc" "$work/train.log" | tail -n 1
ckpt=$work/run/checkpoints/best.ckpt

step "(b) eval best.ckpt on val"
# split=val: eval's default (auto) scores the test split when the data has one, as shapes does.
logged eval "$py" -m vision_tl.eval ckpt_path="$ckpt" data.num_workers=0 split=val \
    hydra.run.dir="$work/eval"
"$py" - "$work/run/metrics.json" "$work/eval/metrics.json" <<'EOF'
import json
import sys

best = json.load(open(sys.argv[1]))["best_val_acc"]
scores = json.load(open(sys.argv[2]))
print(f"training best_val_acc {best:.6f}, eval acc {scores['acc']:.6f} on {scores['num_images']} {scores['split']} images")
if scores["split"] != "val" or abs(scores["acc"] - best) > 1e-6:
    sys.exit("eval does not reproduce training's best val accuracy")
EOF

step "(c) export best.ckpt to ONNX, checked under onnxruntime"
logged export "$py" -m vision_tl.export ckpt_path="$ckpt" format=onnx hydra.run.dir="$work/export"
"$py" - "$work/export" <<'EOF'
import json
import pathlib
import sys

out = pathlib.Path(sys.argv[1])
card = json.loads((out / "model.json").read_text())
diff = card.get("max_abs_diff")
print(f"model.onnx {(out / 'model.onnx').stat().st_size / 1e6:.1f} MB, max |onnxruntime - torch| {diff}")
if diff is None or diff > 1e-4:
    sys.exit("the ONNX file's logits differ from PyTorch's")
EOF
