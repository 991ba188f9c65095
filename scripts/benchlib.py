"""What the benchmark scripts share: the machine's CPU as BENCHMARKS.md names
it, and one streamed answer of the `chat` example, timed."""

import json
import subprocess
import time
import urllib.request


def cpu_name() -> str:
    """`lscpu`'s model name, family and model, CPU count and the vector flags that matter."""
    info = {}
    for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
        k, _, v = line.partition(":")
        info[k.strip()] = v.strip()
    flags = [f for f in info.get("Flags", "").split()
             if f in ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_bf16", "amx_int8")]
    return (f"{info.get('Model name', '?')} (family {info.get('CPU family', '?')}, model {info.get('Model', '?')}), "
            f"{info.get('CPU(s)', '?')} CPUs; {' '.join(flags)}")


def chat_stream(url: str, prompt: str, tokens: int, t0: float) -> dict:
    """POST `prompt` to `chat` at `url` (greedy, `tokens` tokens) and read its
    event stream: {"n": generated tokens, "first"/"last": when the first and
    last text events came, in seconds since `t0` (a `time.perf_counter()`)}.
    An error event raises."""
    req = urllib.request.Request(f"{url}/fn/chat/?max_tokens={tokens}&temperature=0",
                                 data=prompt.encode(), method="POST")
    first = last = None
    usage = None
    with urllib.request.urlopen(req, timeout=600) as resp:
        event = None
        for raw in resp:
            line = raw.decode().rstrip("\n")
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                at = time.perf_counter() - t0
                if event == "usage":
                    usage = json.loads(line[6:])
                elif event is None:
                    first = first if first is not None else at
                    last = at
                else:
                    raise RuntimeError(line)
            elif line == "":
                event = None
    return {"n": usage["generated_tokens"], "first": first, "last": last}
