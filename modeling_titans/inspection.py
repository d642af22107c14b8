"""See the neural memory work (`titans inspect`): per layer and memory head, token by token,

    theta_t      the inner learning rate: how much of this token's surprise is written (Eq. 14)
    eta_t        the momentum: how much of the past surprise carries over (Eq. 14)
    alpha_t      the forgetting: how much of the memory decays at this token (Eq. 13)
    surprise_t   ||grad l(M_{t'}; k_t, v_t)||, the gradient of the inner loss (Eq. 12) at the chunk-start
                 weights, which the update writes: large where the memory did not expect this token's value
    ||M_t||      the memory's weight norm after the token (all its weight matrices together)

The sequence is fed one token at a time through a `TitansCache`, which is exactly the full forward (the cache's
guarantee), so every token's state before and after its write is at hand. Forward hooks on each layer's memory
record the numbers; `plot_trace` draws them with the needle and the question of a task example marked.
"""

from __future__ import annotations

import html
import json
import math
import os
from dataclasses import dataclass, field

import torch

from .cache_titans import TitansCache
from .layers.memory_layer import TitansNeuralMemory

SERIES = {  # name in the trace -> label in the figure
    "inner_lr": "θ (inner learning rate)",
    "momentum": "η (momentum)",
    "forget": "α (forgetting)",
    "surprise": "surprise ‖∇ℓ‖",
    "weight_norm": "memory ‖M‖",
}


@dataclass
class MemoryTrace:
    """Per layer, each series as a (tokens, heads) tensor (a series the layer does not have, e.g. momentum switched
    off, is absent); `marks` name spans of token positions (e.g. the needle) to highlight."""

    layers: list[dict[str, torch.Tensor]]
    tokens: list[str]
    marks: dict[str, tuple[int, int]] = field(default_factory=dict)

    def region_means(self) -> list[dict]:
        """Each series' mean over each marked span and over the rest, per layer: the numbers behind the figure."""
        rows = []
        spans = dict(self.marks)
        for index, layer in enumerate(self.layers):
            length = next(iter(layer.values())).shape[0]
            outside = torch.ones(length, dtype=torch.bool)
            for start, end in spans.values():
                outside[start:end] = False
            for region, mask in [(name, _span_mask(length, *span)) for name, span in spans.items()] + [("rest", outside)]:
                if mask.any():
                    row = {"layer": index, "region": region, "tokens": int(mask.sum())}
                    row.update({name: float(values[mask].mean()) for name, values in layer.items()})
                    rows.append(row)
        return rows


def _span_mask(length: int, start: int, end: int) -> torch.Tensor:
    mask = torch.zeros(length, dtype=torch.bool)
    mask[start:end] = True
    return mask


def per_head(gate: torch.Tensor | None) -> torch.Tensor | None:
    """A gate of one token, (1, heads, 1), as (heads,); per-layer gates, (layers, 1, heads, 1), as one series per
    weight matrix and head (layers * heads,), and so per-channel forgetting laid out as (channels, 1, heads, 1)."""
    return None if gate is None else gate.squeeze(-1).select(-2, 0).flatten()


class _Recorder:
    """Forward hook of one memory layer: for each single-token call, the gates, the surprise and the norm."""

    def __init__(self, memory: TitansNeuralMemory):
        self.memory = memory
        self.steps: list[dict[str, torch.Tensor]] = []

    def __call__(self, module, args, output):
        x, tokens, state = args
        state = state if state is not None else module.initial_state(x.shape[0])
        _, new_state = output
        log_retain, log_momentum, lr = module.gates(x)
        if module.config.memory_forget_per_channel:  # (1, heads, 1, channels): a series per channel and head
            log_retain = log_retain.permute(3, 0, 1, 2)
        log_retain, log_momentum, lr = (per_head(g) for g in (log_retain, log_momentum, lr))
        _, k, v, _ = module.project(x, tokens, state)
        tape = {}  # the raw gradient, before any normalisation of the inner step (`MemoryMLP.normalize_gradient`)
        module.network.gradient_factors(state.snapshot, k.float(), v.float(), tape)
        # Each layer's gradient is an outer product a^T g, whose Frobenius norm is |a| |g|.
        squared = sum((a.norm(dim=-1) * g.norm(dim=-1)).pow(2) for a, g in zip(tape["inputs"], tape["raw_errors"]))
        step = {
            "inner_lr": lr,
            "surprise": squared.sqrt()[0, :, 0],
            "weight_norm": torch.stack([w[0].pow(2).sum(dim=(-2, -1)) for w in new_state.weights]).sum(0).sqrt(),
        }
        if module.momentum_gate is not None:
            step["momentum"] = log_momentum.exp()
        if module.forget_gate is not None:
            step["forget"] = -torch.expm1(log_retain)
        self.steps.append({name: value.float().cpu() for name, value in step.items()})

    def series(self) -> dict[str, torch.Tensor]:
        return {name: torch.stack([step[name] for step in self.steps]) for name in self.steps[0]}


@torch.no_grad()
def trace_memory(model, input_ids: torch.Tensor, tokenizer=None, marks=None) -> MemoryTrace:
    """Feeds `input_ids` (1, T) one token at a time and records every memory layer (module docstring)."""
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"trace_memory takes one sequence, input_ids of shape (1, T); got {tuple(input_ids.shape)}.")
    memories = [module for module in model.modules() if isinstance(module, TitansNeuralMemory)]
    if not memories:
        raise ValueError("The model has no neural memory to trace.")
    recorders = [_Recorder(memory) for memory in memories]
    handles = [memory.register_forward_hook(recorder) for memory, recorder in zip(memories, recorders)]
    try:
        cache = TitansCache(model.config)
        device = next(model.parameters()).device
        for position in range(input_ids.shape[1]):
            model(input_ids[:, position : position + 1].to(device), cache=cache, use_cache=True)
    finally:
        for handle in handles:
            handle.remove()
    ids = input_ids[0].tolist()
    tokens = [tokenizer.decode([token]) for token in ids] if tokenizer is not None else [str(token) for token in ids]
    return MemoryTrace([recorder.series() for recorder in recorders], tokens, dict(marks or {}))


MARK_COLORS = {"needle": "tab:red", "question": "tab:green"}


def plot_trace(trace: MemoryTrace, path: str, title: str = ""):
    """One column per layer, one row per series; every head a thin line, their mean a thick one; marked spans
    shaded. Written as a PNG to `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [name for name in SERIES if any(name in layer for layer in trace.layers)]
    fig, axes = plt.subplots(
        len(names), len(trace.layers), figsize=(5.5 * len(trace.layers), 1.9 * len(names)), sharex=True, squeeze=False
    )
    for column, layer in enumerate(trace.layers):
        for row, name in enumerate(names):
            ax = axes[row][column]
            if name in layer:
                values = layer[name].numpy()
                ax.plot(values, linewidth=0.4, alpha=0.5)
                ax.plot(values.mean(axis=1), linewidth=1.2, color="black", label="mean over heads")
                if name in ("surprise", "inner_lr", "forget") and (values > 0).all():
                    ax.set_yscale("log")
            for mark, (start, end) in trace.marks.items():
                ax.axvspan(start, max(end, start + 1), color=MARK_COLORS.get(mark, "tab:orange"), alpha=0.25,
                           label=mark)
            if column == 0:
                ax.set_ylabel(SERIES[name], fontsize=8)
            if row == 0:
                ax.set_title(f"layer {column}", fontsize=9)
            if row == len(names) - 1:
                ax.set_xlabel("token position", fontsize=8)
            ax.tick_params(labelsize=7)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper right", fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(trace: MemoryTrace, output_dir: str, title: str) -> dict[str, str]:
    """The figure (PNG), the numbers (JSON: every series, the marks, the region means) and an HTML page with the
    figure and the region means; returns the paths."""
    os.makedirs(output_dir, exist_ok=True)
    paths = {name: os.path.join(output_dir, f"memory_trace.{name}") for name in ("png", "json", "html")}
    plot_trace(trace, paths["png"], title)
    means = trace.region_means()
    with open(paths["json"], "w") as f:
        json.dump(
            {
                "title": title,
                "marks": trace.marks,
                "region_means": means,
                "layers": [{name: values.tolist() for name, values in layer.items()} for layer in trace.layers],
            },
            f,
        )
    columns = ["layer", "region", "tokens"] + [name for name in SERIES if means and name in means[0]]
    cells = "".join(
        "<tr>" + "".join(f"<td>{_format(row[c])}</td>" for c in columns) + "</tr>" for row in means
    )
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:2em}}td,th{{padding:2px 8px;text-align:right}}</style></head><body>
<h1>{html.escape(title)}</h1><img src="memory_trace.png" style="max-width:100%">
<h2>Means by region</h2><table><tr>{''.join(f'<th>{html.escape(SERIES.get(c, c))}</th>' for c in columns)}</tr>{cells}</table>
</body></html>"""
    with open(paths["html"], "w", encoding="utf-8") as f:
        f.write(page)
    return paths


def _format(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if math.isfinite(value) else str(value)
    return html.escape(str(value))
