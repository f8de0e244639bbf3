"""A loss plot: is it still learning, has it settled, did the learning rate do what was meant?

The raw per-step loss of diffusion training is noise-dominated (random timesteps), so the plot
shows a smoothed curve over it, the fixed-noise evaluation loss beside it (it moves only when the
embedding does), and the learning rate on a second axis.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..atomic_files import write_atomically


def smooth(values: list[float], weight: float = 0.95) -> list[float]:
    """Bias-corrected exponential moving average, so early points are not dragged to zero."""
    smoothed, average = [], 0.0
    for count, value in enumerate(values, start=1):
        average = weight * average + (1 - weight) * value
        smoothed.append(average / (1 - weight**count))
    return smoothed


def write_loss_plot(
    history_path: Path, plot_path: Path, title: str, start_eval: float | None = None
) -> None:
    """`start_eval`: the evaluation loss before the first update, which has no history line."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    records = [json.loads(line) for line in history_path.read_text().splitlines() if line]
    if not records:
        return
    steps = [record["step"] for record in records]
    losses = [record["loss"] for record in records]
    figure, loss_axis = pyplot.subplots(figsize=(8, 4.5), dpi=100)
    loss_axis.plot(steps, losses, color="tab:blue", alpha=0.25, linewidth=0.8, label="loss")
    loss_axis.plot(steps, smooth(losses), color="tab:blue", linewidth=2, label="smoothed loss")
    evaluated = [(0, start_eval)] if start_eval is not None else []
    evaluated += [(r["step"], r["eval_loss"]) for r in records if r.get("eval_loss") is not None]
    if evaluated:
        eval_steps, eval_losses = zip(*evaluated, strict=True)
        loss_axis.plot(
            eval_steps, eval_losses, "o-", color="tab:green", linewidth=2, label="evaluation loss"
        )
    loss_axis.set_xlabel("step")
    loss_axis.set_ylabel("loss", color="tab:blue")
    rate_axis = loss_axis.twinx()
    rate_axis.plot(steps, [record["lr"] for record in records], color="tab:orange", label="lr")
    rate_axis.set_ylabel("learning rate", color="tab:orange")
    loss_axis.set_title(title)
    figure.tight_layout(rect=(0, 0, 1, 0.9))  # room above the axes for the legend
    figure.legend(loc="upper center", ncol=4, frameon=False)
    write_atomically(plot_path, lambda temp: figure.savefig(temp, format="png"))
    pyplot.close(figure)
