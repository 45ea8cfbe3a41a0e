"""The model summary a fit starts with: Lightning's rich table, without its FLOPs.

Lightning counts FLOPs by running the module's `example_input_array`; a
`ClassificationTask` has none (its input size is the data's), so Lightning's own summary
shows a FLOPs column of zeros and "Total FLOPs: 0". This one leaves them out.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import RichModelSummary
from lightning.pytorch.utilities.model_summary import (
    get_formatted_model_size,
    get_human_readable_count,
)

LEFT = (" ", "Name", "Type", "Mode")


class ModelSummary(RichModelSummary):
    """Lightning's `RichModelSummary` without FLOPs; `enabled=False` prints nothing (the
    config passes `trainer.enable_model_summary`, so that switch keeps working)."""

    def __init__(self, max_depth: int = 1, enabled: bool = True, **summarize_kwargs: Any) -> None:
        super().__init__(max_depth if enabled else 0, **summarize_kwargs)

    @staticmethod
    def summarize(
        summary_data: list[tuple[str, list[str]]],
        total_parameters: int,
        trainable_parameters: int,
        model_size: float,
        total_training_modes: dict[str, int],
        total_flops: int = 0,
        **summarize_kwargs: Any,
    ) -> None:
        from rich import get_console
        from rich.table import Table

        columns = [(name, values) for name, values in summary_data if name != "FLOPs"]
        table = Table(header_style=summarize_kwargs.get("header_style", "bold magenta"))
        for name, _ in columns:
            table.add_column(
                name,
                justify="left" if name in LEFT else "right",
                style="dim" if name == " " else None,
                no_wrap=name == "Name",
            )
        for row in zip(*(values for _, values in columns), strict=True):
            table.add_row(*row)

        grid = Table.grid(expand=True)
        grid.add_column()
        frozen = total_parameters - trainable_parameters
        for label, value in (
            ("Trainable params", get_human_readable_count(int(trainable_parameters))),
            ("Non-trainable params", get_human_readable_count(int(frozen))),
            ("Total params", get_human_readable_count(int(total_parameters))),
            ("Total estimated model params size (MB)", get_formatted_model_size(model_size)),
            ("Modules in train mode", total_training_modes["train"]),
            ("Modules in eval mode", total_training_modes["eval"]),
        ):
            grid.add_row(f"[bold]{label}[/]: {value}")
        console = get_console()
        console.print(table)
        console.print(grid)
