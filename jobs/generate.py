"""Sample text from a trained run: `leviathan generate --run DIR --prompt TEXT`.

Loads `<run>/final/` (the ensemble and its tokenizer, no Ray), encodes the
prompt and samples with the models' cached incremental decoding: from the
merged ensemble, or with `--member m0.1` from one member alone. A seeded
`torch.Generator` makes the same seed give the same text.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from jobs.entry import run_cli
from jobs.evaluate import RunError, load_final


class GenerateError(ValueError):
    """Sampling settings that cannot be used; the message is one line."""


def generate_text(
    run_dir: str | Path,
    prompt: str,
    *,
    max_new_tokens: int = 200,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int = 0,
    member: str | None = None,
    device: str = "cpu",
) -> str:
    """The prompt's continuation (the new text only) sampled from the run's final model.

    member: a member name ("m0.1") to sample from that member alone; default the
    merged ensemble. An empty prompt starts from the end-of-text token, i.e.
    a fresh document. temperature 0 is greedy decoding; top_k keeps the k most
    likely tokens at every step.
    """
    import torch

    from leviathan.model.component import check_sampling

    if max_new_tokens < 1:  # the model allows 0 new tokens; a CLI asking for none is a mistake
        raise GenerateError(f"max_new_tokens: must be >= 1, got {max_new_tokens}")
    try:  # checked before loading the run, with the models' own rules
        check_sampling(max_new_tokens, temperature, top_k)
    except ValueError as e:
        raise GenerateError(str(e)) from None

    ensemble, tokenizer = load_final(run_dir, device=device)
    model = ensemble
    if member is not None:
        names = ensemble.member_names
        if member not in names:
            raise GenerateError(f"member: unknown member {member!r}; this run has {', '.join(names)}")
        model = ensemble.members[names.index(member)]

    ids = tokenizer.encode(prompt) or [tokenizer.eos_id]
    idx = torch.tensor([ids], dtype=torch.long, device=device)  # (1, T)
    generator = torch.Generator(device=device).manual_seed(seed)
    out = model.generate(idx, max_new_tokens, temperature=temperature, top_k=top_k, generator=generator)
    return tokenizer.decode(out[0, len(ids) :].tolist())  # (N,) new tokens only


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="leviathan generate", description="Sample text from a trained run's final ensemble (or one member)."
    )
    p.add_argument("--run", required=True, help="run folder (<storage>/<name>) containing final/")
    p.add_argument("--prompt", default="", help="text to continue (default: start a new document)")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--member", default=None, help="sample from one member (e.g. m0.1) instead of the ensemble")
    p.add_argument("--device", default="cpu")
    return p


def _generate_and_print(args: argparse.Namespace) -> None:
    """Sample from `args.run` and print the prompt with its continuation."""
    text = generate_text(args.run, args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                         top_k=args.top_k, seed=args.seed, member=args.member, device=args.device)
    sys.stdout.write(args.prompt + text + "\n")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli("leviathan generate", lambda: _generate_and_print(args), (RunError, GenerateError))


if __name__ == "__main__":
    sys.exit(main())
