"""200 training steps of a tiny MoE language-model block on the Triton and torch backends.

The model: token embedding -> ``x + MoE(rms_norm(x))`` (moeflux's layer: softmax top-k router,
SwiGLU routed experts, one shared expert) -> RMS norm -> vocabulary head. The data: sequences
drawn from a fixed random bigram table (seeded), so the loss has something to learn. Both
backends start from the same weights and see the same batches; the loss is cross-entropy plus
the load-balancing and z-losses from :class:`moeflux.MoEAux`.

"Agree within noise" is measured, not assumed: the noise is the spread between two torch-backend
runs that differ only in the data order (another data seed), and the Triton run must stay closer
to its torch twin (same data) than that spread, on the loss smoothed over 10 steps.

    PYTHONPATH=src python3 benchmarks/train_curve_gpu.py --out $OUT          # bf16, on the GPU
    TRITON_INTERPRET=1 PYTHONPATH=src python3 benchmarks/train_curve_gpu.py --smoke --out /tmp/curve
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

import moeflux
from _common import git_commit, pick_device, report_path, write_report


class TinyMoELM(nn.Module):
    """Embedding, one pre-norm MoE block with a residual, a norm and the vocabulary head."""

    def __init__(self, vocab: int, config: moeflux.MoEConfig, backend: str, device, dtype) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, config.hidden_size, device=device, dtype=dtype)
        self.moe = moeflux.MoE(config, backend=backend, device=device, dtype=dtype)
        self.head = nn.Linear(config.hidden_size, vocab, bias=False, device=device, dtype=dtype)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, moeflux.MoEAux]:
        x = self.embed(tokens)
        moe_out, aux = self.moe(F.rms_norm(x, (x.shape[-1],)))
        x = x + moe_out
        return self.head(F.rms_norm(x, (x.shape[-1],))), aux


def bigram_batches(vocab: int, batch: int, seq: int, steps: int, data_seed: int, device) -> list[torch.Tensor]:
    """``steps`` batches of ``[batch, seq + 1]`` tokens from one fixed random bigram table
    (table seed 0: every run learns the same language; ``data_seed`` picks the sequences)."""
    table_generator = torch.Generator().manual_seed(0)
    logits = 3.0 * torch.randn(vocab, vocab, generator=table_generator)
    probs = torch.softmax(logits, dim=-1)
    generator = torch.Generator().manual_seed(1000 + data_seed)
    batches = []
    for _ in range(steps):
        tokens = torch.empty(batch, seq + 1, dtype=torch.int64)
        tokens[:, 0] = torch.randint(vocab, (batch,), generator=generator)
        for position in range(seq):
            tokens[:, position + 1] = torch.multinomial(probs[tokens[:, position]], 1, generator=generator)[:, 0]
        batches.append(tokens.to(device))
    return batches


def train(backend: str, batches, vocab, config, device, dtype, lr: float) -> list[float]:
    torch.manual_seed(0)  # the same initial weights for every run
    model = TinyMoELM(vocab, config, backend, device, dtype)
    with torch.no_grad():
        model.moe.reset_parameters()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    losses = []
    for tokens in batches:
        logits, aux = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.float().reshape(-1, vocab), tokens[:, 1:].reshape(-1))
        total = loss + 0.01 * aux.load_balancing_loss + 1e-3 * aux.router_z_loss
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return losses


def smooth(values: list[float], window: int = 10) -> list[float]:
    return [sum(values[max(0, i - window + 1) : i + 1]) / len(values[max(0, i - window + 1) : i + 1])
            for i in range(len(values))]  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=".")
    parser.add_argument("--smoke", action="store_true", help="a few CPU steps at tiny sizes (interpreter)")
    args = parser.parse_args()
    picked = pick_device(args.smoke)
    if picked is None:
        return 1
    device, device_name = picked
    if args.smoke:
        vocab, batch, seq, steps, dtype = 32, 2, 8, 4, torch.float32
        config = moeflux.MoEConfig(hidden_size=32, expert_size=16, num_experts=4, top_k=2, num_shared_experts=1)
    else:
        vocab, batch, seq, steps, dtype = 512, 16, 128, 200, torch.bfloat16
        config = moeflux.MoEConfig(hidden_size=256, expert_size=256, num_experts=16, top_k=2, num_shared_experts=1)
    lr = 3e-3
    started = time.perf_counter()
    same_data = bigram_batches(vocab, batch, seq, steps, 0, device)
    other_data = bigram_batches(vocab, batch, seq, steps, 1, device)
    runs = {
        "triton": train("triton", same_data, vocab, config, device, dtype, lr),
        "torch": train("torch", same_data, vocab, config, device, dtype, lr),
        "torch, other data order": train("torch", other_data, vocab, config, device, dtype, lr),
    }
    smoothed = {name: smooth(losses) for name, losses in runs.items()}
    half = steps // 2  # compare the second half, after the fast initial drop
    backend_gap = max(abs(a - b) for a, b in zip(smoothed["triton"][half:], smoothed["torch"][half:]))
    noise = max(abs(a - b) for a, b in zip(smoothed["torch"][half:], smoothed["torch, other data order"][half:]))
    agree = backend_gap <= noise
    report = {
        "device": device_name, "commit": git_commit(), "date": time.strftime("%Y-%m-%d"), "dtype": str(dtype),
        "config": dataclasses.asdict(config), "vocab": vocab,
        "tokens_per_step": batch * seq, "steps": steps, "lr": lr, "losses": runs,
        "max_smoothed_gap_triton_vs_torch": backend_gap, "max_smoothed_gap_data_order": noise,
        "agree_within_noise": agree, "seconds": time.perf_counter() - started,
    }  # fmt: skip
    json_path = report_path(args.out, "train_curve_gpu.json")
    markdown = (
        f"Tiny MoE LM, {steps} steps, {batch * seq} tokens a step, {dtype}, on {device_name} "
        f"(commit {report['commit']}, {report['date']})\n\n"
        "| run | first loss | last loss (10-step mean) |\n|---|---|---|\n"
        + "".join(f"| {name} | {losses[0]:.4f} | {smoothed[name][-1]:.4f} |\n" for name, losses in runs.items())
        + f"\nlargest gap of the 10-step mean loss over steps {half}..{steps - 1}: triton vs torch (same data) "
        f"{backend_gap:.4f}; torch vs torch with another data order (the noise) {noise:.4f}: "
        f"{'agree within noise' if agree else 'DISAGREE'}\n"
    )
    write_report(json_path, report, markdown)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        figure, axis = plt.subplots(figsize=(7, 4))
        for name, losses in runs.items():
            axis.plot(losses, alpha=0.25, linewidth=0.8)
            axis.plot(smoothed[name], label=f"{name} (10-step mean)", color=axis.lines[-1].get_color())
        axis.set_xlabel("step")
        axis.set_ylabel("cross-entropy loss")
        axis.set_title(f"Tiny MoE LM on {device_name}, {str(dtype).replace('torch.', '')}")
        axis.legend()
        figure.tight_layout()
        figure.savefig(json_path.with_suffix(".png"), dpi=120)
    except ImportError:
        print("matplotlib missing: no plot", file=sys.stderr)
    print(markdown)
    return 0 if agree or args.smoke else 1


if __name__ == "__main__":
    sys.exit(main())
