"""The phase table of a training run (``enclave train`` prints it; the README shows one)."""

from __future__ import annotations

from models.training.host import RunResult

__all__ = ["phase_table", "result_json"]

PHASES = ("load", "compute", "exchange", "checkpoint")


def phase_table(result: RunResult, *, steps: int) -> str:
    """Accuracy, then per phase the slowest worker's seconds and its share of the run."""
    phases = result.phases
    busy = sum(phases.values()) or 1.0
    lines = [
        f"accuracy {result.accuracy:.4f} on the test set after {steps} steps, "
        f"{result.world} worker(s)"
        + (f", {len(result.resumes)} resume(s)" if result.resumes else ""),
        f"{'phase':<12}{'seconds':>10}{'share':>8}",
    ]
    for name in PHASES:
        seconds = phases[f"{name}_s"]
        lines.append(f"{name:<12}{seconds:>10.3f}{seconds / busy:>8.1%}")
    lines.append(f"{'wall':<12}{result.wall_s:>10.3f}")
    return "\n".join(lines)


def result_json(result: RunResult, *, steps: int) -> dict[str, object]:
    """The run as JSON (``enclave train --json``)."""
    return {
        "accuracy": result.accuracy,
        "steps": steps,
        "workers": result.world,
        "resumes": list(result.resumes),
        **{k: round(v, 6) for k, v in result.phases.items()},
        "wall_s": round(result.wall_s, 6),
        "final_checkpoint_sha384": result.final_sha384.hex(),
    }
