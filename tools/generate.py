"""Generate text with true recurrence, streamed as the tokens come.

    python tools/generate.py outputs/debug_model "def parse(text):" --max-new-tokens 64 --seed 0
    python tools/generate.py exported/debug --prompt-file prompts.txt --temperature 0.8 --top-p 0.95 --batch-size 4
    echo "import os" | python tools/generate.py exported/debug.pt --stdin --prefill schedule --temperature 0

The model is a DCP checkpoint (step folder, or a run's dump or checkpoints
folder: its newest step), an exported folder or an exported torch file
(tools/convert_checkpoint.py). Prompts come from the arguments, --prompt-file
(one per line) and --stdin (one per line); none means one empty prompt. Every
prompt is encoded after a BOS token, as documents start in training.

Decoding feeds each new token with the exact memory m_t = s_{t-1} (KV cache plus
one state vector per sequence). --prefill chooses how the prompt is processed:
"exact" (token by token, the true recurrence), "schedule" (the training
schedule in parallel, then exact decoding from its merged state) or "zero" (one
parallel pass with zero memory). For a baseline (LRT off) all three agree.

Sampling: --temperature 0 is greedy; otherwise softmax sampling at that
temperature, restricted to the --top-k most likely tokens and then to the
smallest set whose probability reaches --top-p. --seed makes it reproducible
(for the same prompts, batch size and device).

Stopping: documents are BOS-delimited, so a model ends a document by starting
the next one: a sequence stops at the first BOS it generates (which is also the
end-of-text token of tokenizers such as GPT-2's) or at a --stop-id token, and
otherwise after --max-new-tokens. The stop token is not printed.

Output: for a single sequence, the prompt then the continuation, streamed
as it comes. For several, each sequence's text (prompt included)
is printed line by line as lines complete, every line tagged "[k] " with the
sequence number k (prompts in order; --num-samples copies of a prompt are
consecutive). Timing goes to stderr.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from typing import TextIO

import torch

from titan_lrt.data.tokenizer import Tokenizer
from titan_lrt.export import load_model
from titan_lrt.model.decoding import PREFILL_MODES, generate, seeded_generator
from titan_lrt.model.transformer import Transformer


class TextStream:
    """Incremental detokenization of one sequence: the text that new tokens add, holding back
    a trailing partial UTF-8 character until it is complete."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.emitted = 0

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        return self._emit(text)

    def flush(self) -> str:
        return self._emit(self.tokenizer.decode(self.ids))

    def _emit(self, text: str) -> str:
        new, self.emitted = text[self.emitted :], len(text)
        return new


class PlainText:
    """Output of a single sequence: its text as it comes."""

    def __init__(self, out: TextIO):
        self.out = out

    def write(self, b: int, text: str) -> None:
        self.out.write(text)
        self.out.flush()

    def finish(self, b: int) -> None:
        self.out.write("\n")


class TaggedLines:
    """Output of a batch: each sequence's complete lines, tagged with its number."""

    def __init__(self, out: TextIO, numbers: Sequence[int]):
        self.out, self.numbers = out, list(numbers)
        self.pending = ["" for _ in numbers]

    def write(self, b: int, text: str) -> None:
        *lines, self.pending[b] = (self.pending[b] + text).split("\n")
        for line in lines:
            self.out.write(f"[{self.numbers[b]}] {line}\n")
        self.out.flush()

    def finish(self, b: int) -> None:
        if self.pending[b]:
            self.write(b, "\n")


def read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompts)
    if args.prompt_file:
        with open(args.prompt_file, encoding="utf-8") as f:
            prompts += [line.rstrip("\n") for line in f if line.strip()]
    if args.stdin:
        prompts += [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if args.unescape:
        prompts = [p.encode("utf-8").decode("unicode_escape").encode("latin-1").decode("utf-8") for p in prompts]
    return prompts or [""]


def run_batch(
    model: Transformer,
    tokenizer: Tokenizer,
    texts: list[str],
    numbers: list[int],
    args,
    generator,
    out: TextIO,
    tagged: bool,
) -> int:
    """Generate for one batch of prompts, writing as it goes (tagged lines, or plain text for a
    single sequence); returns the number of new tokens."""
    prompts = [[tokenizer.bos_id, *tokenizer.encode(t)] for t in texts]
    limit = model.args.max_seq_len
    for number, p in zip(numbers, prompts):
        if len(p) + args.max_new_tokens > limit:
            raise ValueError(
                f"prompt {number} has {len(p)} tokens (BOS included); with --max-new-tokens "
                f"{args.max_new_tokens} that exceeds the model's max_seq_len {limit}"
            )
    streams = [TextStream(tokenizer) for _ in texts]
    writer = TaggedLines(out, numbers) if tagged else PlainText(out)
    for b, text in enumerate(texts):
        writer.write(b, text)
    stops = [tokenizer.bos_id, *args.stop_id]
    steps = generate(
        model,
        prompts,
        args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        prefill_mode=args.prefill,
        stop_tokens=stops,
        generator=generator,
    )
    generated = 0
    for tokens, done in steps:
        for b, (token, was_done) in enumerate(zip(tokens.tolist(), done.tolist())):
            if was_done:
                continue
            generated += 1
            if token in stops:
                writer.write(b, streams[b].flush())
                writer.finish(b)
                streams[b] = None
            else:
                writer.write(b, streams[b].push(token))
    for b, stream in enumerate(streams):
        if stream is not None:  # ran out of --max-new-tokens
            writer.write(b, stream.flush())
            writer.finish(b)
    return generated


def main(argv: list[str] | None = None, out: TextIO = sys.stdout) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="DCP step/checkpoints/dump folder, exported folder, or exported torch file")
    parser.add_argument("prompts", nargs="*", help="prompt texts")
    parser.add_argument("--prompt-file", help="a file of prompts, one per line (blank lines skipped)")
    parser.add_argument("--stdin", action="store_true", help="read prompts from stdin, one per line")
    parser.add_argument("--unescape", action="store_true", help=r"interpret backslash escapes such as \n in prompts")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="default: %(default)s")
    parser.add_argument("--temperature", type=float, default=1.0, help="0: greedy (default: %(default)s)")
    parser.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens")
    parser.add_argument("--top-p", type=float, default=None, help="nucleus sampling: probability mass kept, in (0, 1]")
    parser.add_argument("--prefill", choices=PREFILL_MODES, default="exact", help="default: %(default)s")
    parser.add_argument("--seed", type=int, default=None, help="seed of the sampler (default: unseeded)")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences decoded together (default: %(default)s)")
    parser.add_argument("--num-samples", type=int, default=1, help="continuations per prompt (default: %(default)s)")
    parser.add_argument(
        "--stop-id", type=int, action="append", default=[], help="another token id that ends a sequence"
    )
    parser.add_argument(
        "--tokenizer", default=None, help="tokenizer.json of a DCP checkpoint whose run tokenizer moved"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="default: %(default)s")
    args = parser.parse_args(argv)
    for name, value, ok, allowed in (
        ("--max-new-tokens", args.max_new_tokens, args.max_new_tokens >= 1, ">= 1"),
        ("--batch-size", args.batch_size, args.batch_size >= 1, ">= 1"),
        ("--num-samples", args.num_samples, args.num_samples >= 1, ">= 1"),
        ("--top-k", args.top_k, args.top_k is None or args.top_k >= 1, ">= 1"),
        ("--top-p", args.top_p, args.top_p is None or 0 < args.top_p <= 1, "in (0, 1]"),
    ):
        if not ok:
            parser.error(f"{name}={value}: must be {allowed}")

    try:
        loaded = load_model(args.model, args.device, args.tokenizer)
        model, tokenizer, model_args = loaded.model, loaded.tokenizer, loaded.model.args
        texts = [t for t in read_prompts(args) for _ in range(args.num_samples)]
        generator = seeded_generator(args.seed, args.device)  # one stream over all batches
        start, generated = time.perf_counter(), 0
        for first in range(0, len(texts), args.batch_size):
            batch = texts[first : first + args.batch_size]
            numbers = list(range(first, first + len(batch)))
            generated += run_batch(model, tokenizer, batch, numbers, args, generator, out, tagged=len(texts) > 1)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - start
    print(
        f"[{len(texts)} sequences, {generated} new tokens in {seconds:.2f} s ({generated / seconds:.1f} tokens/s), "
        f"LRT mode {model_args.lrt.mode}, prefill {args.prefill}]",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
