"""Why did the compiled fast recipe not learn on an H100? Eager against torch.compile, variant by variant.

A CBAM-ResNet18 (width 64, batch 256, bf16 autocast, channels_last, fused SGD: the fast recipe's step)
is compiled under each variant below, in this order (a run cut short keeps the first ones):

* ``default``: Inductor as torch ships it, CBAM's max pooling as ``amax``;
* ``max_indices``: max pooling as ``torch.max(dim).values`` (saves the argmax; no tie count in backward);
* ``emulate_precision_casts``: ``torch._inductor.config.emulate_precision_casts = True`` (lead a:
  pytorch#195214 / #186799, amax's backward divides by a tie count that a fused, unrounded comparison
  can make 0);
* ``no_mix_order_reduction``: ``torch._inductor.config.triton.mix_order_reduction = False`` (lead b:
  pytorch#190796 / #193061);
* ``both``: the two settings together;
* ``library``: the library's own CBAM as ``cbam.build_resnet`` builds it (its own max formulation and
  implementation), Inductor defaults.

For each: one training step's loss and every gradient against eager mode in the same dtype (NaN, lost
or wrong gradients), then ``--steps`` SGD steps on a learnable synthetic task (does the loss fall?). The
variants other than ``library`` swap each CBAM for a local module with the same parameters and the
chosen max, so the library needs no knob for this. JSON after every variant; the last line printed is
the verdict naming the cause. Examples::

    python benchmarks/compile_diagnosis.py --out compile_diagnosis.json      # on a GPU, ~4 min on an H100
    python benchmarks/compile_diagnosis.py --quick                           # CPU smoke run (aot_eager)
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import torch
import torch._inductor.config as inductor_config
from torch import nn


def _inductor_defaults() -> dict:
    """Torch's own values of the settings under test that this torch has."""
    defaults = {"emulate_precision_casts": inductor_config.emulate_precision_casts}
    if hasattr(inductor_config.triton, "mix_order_reduction"):  # torch >= 2.10
        defaults["triton.mix_order_reduction"] = inductor_config.triton.mix_order_reduction
    return defaults


# Read before the library is imported: it may set its own workarounds.
INDUCTOR_DEFAULTS = _inductor_defaults()

from cbam import CBAM, build_resnet
from cbam.analysis.compile_check import compare_steps, compiled_copy, training_step

#: name -> (max formulation, or None for the library's own CBAM; Inductor settings over torch's defaults)
VARIANTS = {
    "default": ("amax", {}),
    "max_indices": ("max_indices", {}),
    "emulate_precision_casts": ("amax", {"emulate_precision_casts": True}),
    "no_mix_order_reduction": ("amax", {"triton.mix_order_reduction": False}),
    "both": ("amax", {"emulate_precision_casts": True, "triton.mix_order_reduction": False}),
    "library": (None, {}),
}


def _spatial_max(x: torch.Tensor, formulation: str) -> torch.Tensor:
    """(N, C, H, W) -> (N, C): the channel gate's max pooling, as ``amax`` or ``torch.max(...).values``."""
    if formulation == "amax":
        return x.amax(dim=(2, 3))
    return x.flatten(2).max(dim=2).values


def _channel_max(x: torch.Tensor, formulation: str) -> torch.Tensor:
    """(N, C, H, W) -> (N, 1, H, W): the spatial gate's max map, as ``amax`` or ``torch.max(...).values``."""
    if formulation == "amax":
        return x.amax(dim=1, keepdim=True)
    return x.max(dim=1, keepdim=True).values


class DiagnosisCBAM(nn.Module):
    """CBAM (channel gate, then spatial gate) over a library CBAM's parameters, with the max pooling of
    both gates formulated as ``formulation``."""

    def __init__(self, library_cbam: nn.Module, formulation: str) -> None:
        super().__init__()
        self.mlp = library_cbam.channel.mlp
        self.conv, self.bn = library_cbam.spatial.conv, library_cbam.spatial.bn
        self.formulation = formulation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        descriptors = torch.cat((x.mean(dim=(2, 3)), _spatial_max(x, self.formulation)), dim=0)
        avg_out, max_out = self.mlp(descriptors).chunk(2, dim=0)
        x = x * torch.sigmoid(avg_out + max_out)[:, :, None, None]
        maps = torch.cat((_channel_max(x, self.formulation), x.mean(dim=1, keepdim=True)), dim=1)
        return x * torch.sigmoid(self.bn(self.conv(maps)))


def with_formulation(net: nn.Module, formulation: str | None) -> nn.Module:
    """A copy of ``net`` whose CBAMs use ``formulation`` (None: the library's CBAM, unchanged)."""
    net = copy.deepcopy(net)
    if formulation is None:
        return net
    for parent in list(net.modules()):
        for name, child in parent.named_children():
            if isinstance(child, CBAM):
                setattr(parent, name, DiagnosisCBAM(child, formulation))
    return net


def synthetic_batches(count: int, batch_size: int, size: int, device: torch.device, seed: int = 0):
    """``count`` batches of a task a working network learns in a few steps: each class is a fixed random
    pattern, each image its class's pattern plus as much noise."""
    generator = torch.Generator().manual_seed(seed)
    patterns = torch.randn(10, 3, size, size, generator=generator)
    batches = []
    for _ in range(count):
        labels = torch.randint(0, 10, (batch_size,), generator=generator)
        images = patterns[labels] + torch.randn(batch_size, 3, size, size, generator=generator)
        batches.append((images.to(device).contiguous(memory_format=torch.channels_last), labels.to(device)))
    return batches


def train_losses(net: nn.Module, batches, steps: int, device: torch.device) -> list[float]:
    """Loss of each of ``steps`` SGD steps (bf16 autocast), cycling through ``batches``."""
    optimizer = torch.optim.SGD(
        net.parameters(),
        lr=0.05,
        momentum=0.9,
        nesterov=True,
        weight_decay=5e-4,
        fused=device.type == "cuda" or None,
    )
    net.train()
    losses = []
    for step in range(steps):
        images, labels = batches[step % len(batches)]
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = nn.functional.cross_entropy(net(images), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach().float())
    return [float(loss) for loss in losses]  # one host synchronisation, at the end


def learned(losses: list[float]) -> bool:
    """The loss is finite and its last five steps average under 3/4 of the first step's."""
    tail = losses[-5:]
    return all(map(math.isfinite, losses)) and sum(tail) / len(tail) < 0.75 * losses[0]


def agrees(report: dict, noise_floor: float) -> bool:
    """No NaN or lost gradient, and compiled-vs-eager (bf16) no further apart than 3 x eager bf16 is from
    eager fp32 (at least 5%): honest rounding, not a wrong gradient."""
    return (
        not report["non_finite"]
        and not report["zeroed"]
        and report["loss_relative_error"] <= 0.02
        and report["global_relative_error"] <= max(0.05, 3 * noise_floor)
    )


def verdict(results: dict) -> str:
    ok = {
        name: result["agrees"] and result["learns"] for name, result in results.items() if "agrees" in result
    }
    failed = sorted(name for name, good in ok.items() if not good)
    if not failed:
        return (
            f"no failure reproduced: compiled matches eager and learns in every variant run ({', '.join(ok)})"
        )
    fixes = [
        name
        for name in ("max_indices", "emulate_precision_casts", "no_mix_order_reduction", "both")
        if ok.get(name)
    ]
    library = {
        True: "the library's CBAM compiles correctly",
        False: "the library's CBAM is broken compiled",
        None: "the library variant did not run",
    }[ok.get("library")]
    if "default" not in ok:
        return f"failing: {', '.join(failed)}; {library}"
    if ok["default"]:
        return f"default Inductor works with amax; failing: {', '.join(failed)}; {library}"
    lead_a = ok.get("max_indices") or ok.get("emulate_precision_casts")
    lead_b = ok.get("no_mix_order_reduction")
    if lead_a and not lead_b:
        cause = (
            "amax's backward under Inductor's bf16 fusion (lead a, pytorch#195214): the tie count of the max"
        )
    elif lead_b and not lead_a:
        cause = "Inductor's mix-order reduction (lead b, pytorch#190796 / #193061)"
    elif lead_a and lead_b:
        cause = "either lead alone is enough to fix it (amax tie count, mix-order reduction)"
    elif ok.get("both"):
        cause = "both leads together (only emulate_precision_casts + no mix-order reduction fix it)"
    else:
        cause = "neither lead: no variant fixes it (look at the failing parameters in the JSON)"
    return f"compiled default FAILS; cause: {cause}; fixed by: {', '.join(fixes) or 'none'}; {library}"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--depth", type=int, default=18)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=30, help="training steps per variant")
    parser.add_argument("--backend", default="inductor")
    parser.add_argument(
        "--variants", default=",".join(VARIANTS), help=f"comma list, in order, of {', '.join(VARIANTS)}"
    )
    parser.add_argument(
        "--budget-s", type=float, default=330, help="start no new variant after this many seconds"
    )
    parser.add_argument(
        "--quick", action="store_true", help="tiny sizes, CPU, aot_eager: a smoke run, no verdict"
    )
    parser.add_argument("--out", help="write the results as JSON here (after every variant)")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.variants.split(",")) - set(VARIANTS))
    if unknown:
        parser.error(f"--variants: unknown {', '.join(unknown)}; accepted: {', '.join(VARIANTS)}")
    if args.quick:
        args.width, args.batch_size, args.image_size, args.steps, args.backend = 16, 8, 16, 8, "aot_eager"
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    started = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.quick else "cpu")
    torch.backends.cudnn.benchmark = device.type == "cuda"
    torch.manual_seed(0)
    base = build_resnet(args.depth, use_cbam_block=True, width=args.width).to(
        device, memory_format=torch.channels_last
    )
    batches = synthetic_batches(4, args.batch_size, args.image_size, device)
    images, labels = batches[0]
    results: dict[str, dict] = {}
    report = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
        "torch": torch.__version__,
        "args": {k: v for k, v in vars(args).items() if k != "out"},
        "inductor_defaults": INDUCTOR_DEFAULTS,
        "eager": {},
        "variants": results,
        "verdict": None,
    }

    def save() -> None:
        if args.out:
            Path(args.out).write_text(json.dumps(report, indent=2) + "\n")

    eager_steps = {}  # formulation -> eager bf16 step (the reference of its compiled variants)
    for name in args.variants.split(","):
        formulation, settings = VARIANTS[name]
        if time.perf_counter() - started > args.budget_s:
            results[name] = {"skipped": f"time budget of {args.budget_s} s spent"}
            continue
        if not settings.keys() <= INDUCTOR_DEFAULTS.keys():
            results[name] = {
                "skipped": f"torch {torch.__version__} has no {', '.join(settings.keys() - INDUCTOR_DEFAULTS.keys())}"
            }
            continue
        net = with_formulation(base, formulation)
        key = formulation or "library"
        if key not in eager_steps:
            eager_steps[key] = training_step(net, images, labels, torch.bfloat16)
            fp32 = training_step(net, images, labels, None)
            floor = compare_steps(fp32, eager_steps[key])["global_relative_error"]
            eager_losses = train_losses(copy.deepcopy(net), batches, args.steps, device)
            report["eager"][key] = {
                "bf16_vs_fp32_global_relative_error": floor,
                "losses": eager_losses,
                "learns": learned(eager_losses),
            }
        noise_floor = report["eager"][key]["bf16_vs_fp32_global_relative_error"]
        variant_started = time.perf_counter()
        torch._dynamo.reset()
        with inductor_config.patch(INDUCTOR_DEFAULTS | settings):
            compiled = compiled_copy(net, args.backend)
            comparison = compare_steps(
                eager_steps[key], training_step(compiled, images, labels, torch.bfloat16)
            )
            losses = train_losses(compiled, batches, args.steps, device)
        results[name] = {
            "max_formulation": formulation or "library",
            "inductor_settings": INDUCTOR_DEFAULTS | settings,
            "agrees": agrees(comparison, noise_floor),
            "learns": learned(losses),
            "seconds": round(time.perf_counter() - variant_started, 1),
            "losses": losses,
            **comparison,
        }
        summary = {
            k: results[name][k]
            for k in (
                "agrees",
                "learns",
                "global_relative_error",
                "worst_parameter",
                "max_relative_error",
                "seconds",
            )
        }
        print(
            json.dumps(
                {
                    "variant": name,
                    **summary,
                    "non_finite": len(comparison["non_finite"]),
                    "zeroed": len(comparison["zeroed"]),
                    "last_loss": losses[-1],
                }
            ),
            flush=True,
        )
        save()
    report["verdict"] = "quick CPU run: no GPU verdict" if args.quick else verdict(results)
    save()
    print(f"verdict: {report['verdict']}")
    return report


if __name__ == "__main__":
    main()
