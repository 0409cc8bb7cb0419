"""OTPO benchmark: batched otalign token weights vs the per-pair POT loop, and the DPO step cost of OTPO.

Part 1 computes OTPO weights (eps1 = 1.0, eps2 = 0.2) for batches of preference pairs (a grid of
``--batches`` sizes and ``--hidden`` sizes) with response lengths drawn uniformly from
``--min-len``..``--max-len`` tokens, two ways, on the same inputs: ``otalign.losses.otpo_weights``
(pairs bucketed by length, each bucket one batched solve) and the loop the OTPO reference recipe runs
(per pair: ``torch.cdist`` cost divided by its max, ``ot.unbalanced.sinkhorn_unbalanced(ones, ones, M,
reg=eps1, reg_m=eps2)`` on torch tensors with POT's defaults, marginals scaled to tau = min(|y_c|, |y_r|)).
Both stop at their default tolerance (1e-6). The two are timed alternately, ``--repeats`` times each, and
the table gives the best time of each (the machine this was written on is shared: the minimum is the
least disturbed run), the speed ratio of the best times and the median of the ratios of back-to-back runs
(robust to load that drifts over the run), the number of buckets, the largest weight difference between them
and each one's largest error against a float64 POT solve run to 1e-12.

Part 2 times one DPO (sigmoid) training step (policy forward/backward, frozen reference forward,
AdamW update) of a tiny random Llama built from a config, without and with OTPO token weighting.

Hidden states are synthetic but structured: tokens are drawn from a small vocabulary of random
directions (plus noise), and chosen and rejected responses share part of their vocabulary, so the
cost matrices are far from constant.

Usage: ``python benchmarks/otpo.py [--quick] [--device cpu|cuda]``; prints a table and writes
``benchmarks/results/otpo.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import ot
import torch

from otalign.losses import dpo_loss, otpo_weights, sequence_logps
from otalign.losses.otpo import length_buckets

EPS1, EPS2 = 1.0, 0.2
RESULTS = Path(__file__).resolve().parent / "results" / "otpo.json"


def synthetic_pairs(n_pairs: int, max_len: int, hidden: int, device: str, seed: int = 0, min_len: int | None = None):
    """Padded hidden states (B, L, H) float32 and bool masks (B, L) for chosen and rejected responses, lengths
    uniform in ``min_len``..``max_len`` (default ``max_len // 4``)."""
    gen = torch.Generator().manual_seed(seed)
    vocab = torch.randn(4 * max_len, hidden, generator=gen)
    lengths = torch.randint(min_len or max_len // 4, max_len + 1, (2, n_pairs), generator=gen)
    lengths[:, 0] = max_len  # at least one pair at the full length on each side
    sides = []
    for side, length in enumerate(lengths):
        # Chosen draws from the first 3/4 of the vocabulary, rejected from the last 3/4: half is shared.
        low = side * max_len
        ids = torch.randint(low, low + 3 * max_len, (n_pairs, max_len), generator=gen)
        states = vocab[ids] + 0.5 * torch.randn(n_pairs, max_len, hidden, generator=gen)
        mask = torch.arange(max_len) < length.unsqueeze(-1)
        sides += [states.to(device), mask.to(device)]
    return sides


def pot_loop_weights(chosen, rejected, chosen_mask, rejected_mask, *, float64_oracle=False):
    """Per-pair weights as the OTPO reference recipe computes them, one POT solve per pair."""
    out_c, out_r = torch.zeros(chosen_mask.shape), torch.zeros(rejected_mask.shape)
    for k in range(chosen.shape[0]):
        hc, hr = chosen[k, chosen_mask[k]], rejected[k, rejected_mask[k]]
        if float64_oracle:
            cost = ot.dist(hc.double().cpu().numpy(), hr.double().cpu().numpy(), metric="euclidean")
            a, b, opts = np.ones(len(hc)), np.ones(len(hr)), {"stopThr": 1e-12, "numItermax": 100000}
        else:
            cost = torch.cdist(hc, hr)
            a, b, opts = torch.ones(len(hc), device=hc.device), torch.ones(len(hr), device=hr.device), {}
        plan = ot.unbalanced.sinkhorn_unbalanced(a, b, cost / cost.max(), reg=EPS1, reg_m=EPS2, **opts)
        plan = torch.as_tensor(plan).float().cpu()
        tau = min(len(hc), len(hr))
        out_c[k, chosen_mask[k].cpu()] = plan.sum(1) * tau / plan.sum()
        out_r[k, rejected_mask[k].cpu()] = plan.sum(0) * tau / plan.sum()
    return out_c, out_r


def timed(fn, repeats: int, device: str, warmup: bool = True):
    """Median wall time in seconds of ``fn()`` over ``repeats`` runs (after one warm-up run), and its last result."""
    result = fn() if warmup else None
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def bench_weights(args, pairs: int, hidden: int) -> dict:
    chosen, chosen_mask, rejected, rejected_mask = synthetic_pairs(
        pairs, args.max_len, hidden, args.device, seed=pairs, min_len=args.min_len
    )

    def ours():
        return otpo_weights(chosen, rejected, chosen_mask, rejected_mask)

    def pot():
        return pot_loop_weights(chosen, rejected, chosen_mask, rejected_mask)

    ours()
    pot()  # warm-up, then alternate so that drifting machine load hits both alike
    times = {"otalign": [], "pot": []}
    for _ in range(args.repeats):
        t, (wc, wr) = timed(ours, 1, args.device, warmup=False)
        times["otalign"].append(t)
        t, (pc, pr) = timed(pot, 1, args.device, warmup=False)
        times["pot"].append(t)
    oc, orr = pot_loop_weights(chosen, rejected, chosen_mask, rejected_mask, float64_oracle=True)
    wc, wr = wc.cpu(), wr.cpu()
    lc, lr = chosen_mask.sum(-1).cpu(), rejected_mask.sum(-1).cpu()
    buckets = length_buckets(torch.maximum(lc, lr), torch.minimum(lc, lr), hidden)

    def gap(x, y, z, w):
        return max((x - y).abs().max().item(), (z - w).abs().max().item())

    t_ours, t_pot = min(times["otalign"]), min(times["pot"])
    paired = sorted(p / o for p, o in zip(times["pot"], times["otalign"], strict=True))
    return {
        "pairs": pairs,
        "hidden": hidden,
        "min_len": args.min_len,
        "max_len": args.max_len,
        "chosen_lengths": lc.tolist(),
        "rejected_lengths": lr.tolist(),
        "buckets": [len(b) for b in buckets],
        "otalign_s": t_ours,
        "pot_loop_s": t_pot,
        "otalign_all_s": times["otalign"],
        "pot_loop_all_s": times["pot"],
        "speedup": t_pot / t_ours,
        "speedup_paired_median": paired[len(paired) // 2],
        "max_weight_diff_otalign_vs_pot": gap(wc, pc, wr, pr),
        "max_err_otalign_vs_float64": gap(wc, oc, wr, orr),
        "max_err_pot_loop_vs_float64": gap(pc, oc, pr, orr),
        "max_weight": max(wc.max().item(), wr.max().item()),
    }


def tiny_llama(args, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=args.lm_vocab,
        hidden_size=args.lm_hidden,
        intermediate_size=2 * args.lm_hidden,
        num_hidden_layers=args.lm_layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=args.prompt_len + args.step_len,
    )
    return LlamaForCausalLM(config).to(args.device)


def token_logps(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """(N, T-1) log-probabilities of tokens 1..T-1, from the logits at positions 0..T-2 (float32)."""
    return logits[:, :-1].float().log_softmax(-1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)


def bench_step(args) -> dict:
    gen = torch.Generator().manual_seed(1)
    n, p, r = args.step_pairs, args.prompt_len, args.step_len
    prompts = torch.randint(args.lm_vocab, (n, p), generator=gen).repeat(2, 1)  # chosen rows, then rejected rows
    responses = torch.randint(args.lm_vocab, (2 * n, r), generator=gen)
    lengths = torch.randint(r // 4, r + 1, (2 * n,), generator=gen)
    lengths[0] = r
    input_ids = torch.cat([prompts, responses], 1).to(args.device)
    response_mask = (torch.arange(r) < lengths.unsqueeze(-1)).to(args.device)
    attention_mask = torch.cat([torch.ones(2 * n, p, dtype=torch.bool, device=args.device), response_mask], 1)
    # Shifted frame: position t predicts token t+1, so response token j sits at index p - 1 + j.
    mask = attention_mask[:, 1:].clone()
    mask[:, : p - 1] = False

    policy, reference = tiny_llama(args, seed=0), tiny_llama(args, seed=0).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-5)

    def step(use_otpo: bool) -> None:
        out = policy(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=use_otpo)
        policy_tok = token_logps(out.logits, input_ids)
        with torch.no_grad():
            ref_tok = token_logps(reference(input_ids=input_ids, attention_mask=attention_mask).logits, input_ids)
        weights = None
        if use_otpo:
            states = out.hidden_states[-1][:, p - 1 : -1]  # state at the position that predicts each response token
            wc, wr = otpo_weights(states[:n], states[n:], mask[:n, p - 1 :], mask[n:, p - 1 :])
            weights = torch.zeros_like(policy_tok)
            weights[:, p - 1 :] = torch.cat([wc, wr])
        pol = sequence_logps(policy_tok, mask, weights)
        ref = sequence_logps(ref_tok, mask, weights)
        loss, _, _ = dpo_loss(pol[:n], pol[n:], ref[:n], ref[n:], beta=0.1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    # Warm up both variants, then alternate them so that drifting machine load hits both alike.
    step(False)
    step(True)
    times = {False: [], True: []}
    for _ in range(args.repeats):
        for use_otpo in (False, True):
            times[use_otpo].append(timed(lambda use_otpo=use_otpo: step(use_otpo), 1, args.device, warmup=False)[0])
    t_plain, t_otpo = min(times[False]), min(times[True])
    return {
        "pairs": n,
        "prompt_len": p,
        "max_response_len": r,
        "lm": {"hidden": args.lm_hidden, "layers": args.lm_layers, "vocab": args.lm_vocab},
        "dpo_step_s": t_plain,
        "dpo_otpo_step_s": t_otpo,
        "otpo_overhead": t_otpo / t_plain - 1,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8, 16, 32], help="pairs per batch (grid)")
    parser.add_argument("--hidden", type=int, nargs="+", default=[576, 2048], help="hidden sizes (grid)")
    parser.add_argument("--min-len", type=int, default=32, help="shortest response, tokens")
    parser.add_argument("--max-len", type=int, default=512, help="longest response, tokens")
    parser.add_argument("--step-pairs", type=int, default=4, help="pairs per DPO step")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--step-len", type=int, default=256, help="longest response in the DPO step, tokens")
    parser.add_argument("--lm-hidden", type=int, default=256)
    parser.add_argument("--lm-layers", type=int, default=2)
    parser.add_argument("--lm-vocab", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.quick:
        args.batches, args.hidden, args.min_len, args.max_len = [1, 4, 16], [256], 16, 128
        args.step_pairs, args.step_len, args.lm_hidden, args.repeats = 2, 64, 64, 3

    if args.threads:
        torch.set_num_threads(args.threads)
    grid = [bench_weights(args, pairs, hidden) for hidden in args.hidden for pairs in args.batches]
    step = bench_step(args)
    print(f"device: {args.device} ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)")
    print(f"\nOTPO weights, lengths {args.min_len}-{args.max_len}, best of {args.repeats} alternating runs")
    header = (
        f"{'hidden':>7}{'pairs':>7}{'buckets':>9}{'otalign s':>11}{'POT loop s':>12}{'speed-up':>10}{'paired':>8}"
        f"{'err otalign':>13}{'err POT':>10}"
    )
    print(header)
    print("-" * len(header))
    for row in grid:
        print(
            f"{row['hidden']:>7}{row['pairs']:>7}{len(row['buckets']):>9}{row['otalign_s']:>11.4f}"
            f"{row['pot_loop_s']:>12.4f}{row['speedup']:>9.2f}x{row['speedup_paired_median']:>7.2f}x"
            f"{row['max_err_otalign_vs_float64']:>13.1e}"
            f"{row['max_err_pot_loop_vs_float64']:>10.1e}"
        )
    print("(err: largest |w - w_float64| of the weights, which sum to tau per pair)")
    print(
        f"\nDPO step: {step['pairs']} pairs, prompt {step['prompt_len']}, responses <= {step['max_response_len']}, "
        f"tiny Llama hidden {args.lm_hidden} x {args.lm_layers} layers"
    )
    print(f"{'variant':<28}{'time (s)':>10}")
    print(f"{'DPO':<28}{step['dpo_step_s']:>10.4f}")
    print(f"{'DPO + OTPO weights':<28}{step['dpo_otpo_step_s']:>10.4f}")
    print(f"OTPO step-time ratio: {step['dpo_otpo_step_s'] / step['dpo_step_s']:.3f}x")

    args.output.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "device": args.device,
        "torch": torch.__version__,
        "pot": ot.__version__,
        "threads": torch.get_num_threads(),
        "quick": args.quick,
        "repeats": args.repeats,
        "weights": grid,
        "dpo_step": step,
    }
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.output}")


if __name__ == "__main__":
    main()
