"""A small load generator for an OpenAI-compatible server (the official `openai` client, asyncio).

    .venv/bin/python scripts/openai_load.py --url http://127.0.0.1:8000/v1 --model mixtral-1024 \
        --concurrency 1 8 32 --prompt-tokens 32 --max-tokens 32 [--requests-per-client 4] [--json out.json]

For each concurrency C: C clients, each sending --requests-per-client streamed greedy completions
one after another (prompts: --prompt-tokens random token ids, so no tokenizer is needed), after
one untimed warm-up request per client. Per concurrency it prints

    TTFT          time to the first streamed chunk (ms: mean, p50, p90)
    TPOT          time per output token after the first: (latency - TTFT) / (tokens - 1), ms
    output tok/s  completion tokens of all requests / wall time of the run

Token counts are the server's (`usage`, via stream_options.include_usage). Bounded: it sends
C x (requests-per-client + 1) requests to --url and stops (loopback only, for this machine).

Long prompts arriving (chunked prefill's test): with --long-prompt-tokens N, --long-clients K
(default 1) more clients keep sending prompts of N random token ids (max_tokens 1, not streamed),
one after another, from the start of the timed run until its C streams have ended (each waits for
the answer of the prompt in flight, which is not counted). The TTFT and TPOT above are then those
of the C regular streams while long prompts arrive; the table gains the long prompts served
during the run and their mean latency. Compare a run with and without the flags:

    .venv/bin/python scripts/openai_load.py --url http://127.0.0.1:8000/v1 --model mixtral-1024 \
        --concurrency 8 --long-prompt-tokens 2000 [--long-clients 1]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time

import openai


async def one_request(client: openai.AsyncOpenAI, model: str, prompt: list[int], max_tokens: int) -> dict:
    started = time.perf_counter()
    first, tokens = None, 0
    stream = await client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                             stream=True, stream_options={"include_usage": True})
    async for chunk in stream:
        if first is None and chunk.choices:
            first = time.perf_counter()
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    done = time.perf_counter()
    first = first or done
    return {"ttft_s": first - started, "latency_s": done - started, "tokens": tokens,
            "tpot_s": (done - first) / (tokens - 1) if tokens > 1 else None}


async def long_prompt_loop(client: openai.AsyncOpenAI, model: str, prompt, running: asyncio.Event) -> dict:
    """Prompts of --long-prompt-tokens ids (max_tokens 1, not streamed), one after another while `running`
    is set; those answered while it was set count as served (failures are counted, the loop goes on)."""
    served, failed, latencies = 0, 0, []
    while running.is_set():
        started = time.perf_counter()
        try:
            await client.completions.create(model=model, prompt=prompt(), max_tokens=1, temperature=0)
        except openai.OpenAIError:
            failed += 1
            await asyncio.sleep(0.1)
            continue
        if running.is_set():
            served += 1
            latencies.append(time.perf_counter() - started)
    return {"served": served, "failed": failed, "latencies_s": latencies}


async def run_level(args: argparse.Namespace, concurrency: int) -> dict:
    client = openai.AsyncOpenAI(base_url=args.url, api_key=args.api_key, max_retries=0, timeout=600)
    rng = random.Random(concurrency)
    long_rng = random.Random(-concurrency)  # its own draws: the streams' prompts are those of a run without

    def prompt() -> list[int]:
        return [rng.randrange(args.min_token_id, args.vocab) for _ in range(args.prompt_tokens)]

    def long_prompt() -> list[int]:
        return [long_rng.randrange(args.min_token_id, args.vocab) for _ in range(args.long_prompt_tokens)]

    async def client_loop(warm: bool) -> list[dict]:
        return [await one_request(client, args.model, prompt(), args.max_tokens)
                for _ in range(1 if warm else args.requests_per_client)]

    await asyncio.gather(*(client_loop(True) for _ in range(concurrency)))  # warm-up, untimed
    running, long_tasks = asyncio.Event(), []
    running.set()
    if args.long_prompt_tokens:
        long_tasks = [asyncio.create_task(long_prompt_loop(client, args.model, long_prompt, running))
                      for _ in range(args.long_clients)]
    started = time.perf_counter()
    results = [r for rs in await asyncio.gather(*(client_loop(False) for _ in range(concurrency))) for r in rs]
    wall = time.perf_counter() - started
    running.clear()
    longs = await asyncio.gather(*long_tasks)  # each waits for its prompt in flight (not counted)
    await client.close()
    ttft = [r["ttft_s"] * 1e3 for r in results]
    tpot = [r["tpot_s"] * 1e3 for r in results if r["tpot_s"] is not None]
    level = {"concurrency": concurrency, "requests": len(results), "output_tokens": sum(r["tokens"] for r in results),
             "wall_s": round(wall, 2), "output_tok_s": round(sum(r["tokens"] for r in results) / wall, 2),
             "ttft_ms": _stats(ttft), "tpot_ms": _stats(tpot)}
    if args.long_prompt_tokens:
        level["long_prompts"] = {"tokens": args.long_prompt_tokens, "clients": args.long_clients,
                                 "served": sum(r["served"] for r in longs),
                                 "failed": sum(r["failed"] for r in longs),
                                 "latency_ms": _stats([s * 1e3 for r in longs for s in r["latencies_s"]])}
    return level


def _stats(values: list[float]) -> dict:
    if not values:
        return {}
    ordered = sorted(values)
    return {"mean": round(statistics.fmean(values), 1), "p50": round(ordered[len(ordered) // 2], 1),
            "p90": round(ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))], 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000/v1", help="base URL of the OpenAI API")
    parser.add_argument("--model", required=True)
    parser.add_argument("--api-key", default="none", help="bearer token, if the server wants one")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests-per-client", type=int, default=4)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--vocab", type=int, default=32000, help="prompt ids are drawn from [min-token-id, vocab)")
    parser.add_argument("--min-token-id", type=int, default=300)
    parser.add_argument("--long-prompt-tokens", type=int, default=0,
                        help="also keep sending prompts of this many token ids (max_tokens 1) while the streams run")
    parser.add_argument("--long-clients", type=int, default=1, help="clients sending those long prompts")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    if args.long_prompt_tokens < 0 or args.long_clients < 1:
        parser.error("--long-prompt-tokens must be >= 0 and --long-clients >= 1")
    levels = []
    long_header = f" {'long served':>11} {'long ms (mean)':>14}" if args.long_prompt_tokens else ""
    print(f"{'C':>3} {'requests':>8} {'TTFT ms (mean/p50/p90)':>24} {'TPOT ms (mean/p50/p90)':>24} {'output tok/s':>12}"
          + long_header)
    for concurrency in args.concurrency:
        level = asyncio.run(run_level(args, concurrency))
        levels.append(level)
        t, p = level["ttft_ms"], level["tpot_ms"]
        long = level.get("long_prompts")
        long_cells = f" {long['served']:>11} {long['latency_ms'].get('mean', 0):>14.0f}" if long else ""
        print(f"{concurrency:>3} {level['requests']:>8} {t['mean']:>8.0f}/{t['p50']:>6.0f}/{t['p90']:>7.0f} "
              f"{p.get('mean', 0):>8.1f}/{p.get('p50', 0):>6.1f}/{p.get('p90', 0):>7.1f} {level['output_tok_s']:>12.2f}"
              + long_cells, flush=True)
        if long and long["failed"]:
            print(f"    {long['failed']} long prompt(s) failed", flush=True)
    if args.json:
        with open(args.json, "w") as out:
            json.dump(levels, out, indent=2)


if __name__ == "__main__":
    main()
