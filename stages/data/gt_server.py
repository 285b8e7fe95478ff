"""The demo's stand-in for a reasoning LLM: an OpenAI-compatible HTTP server that answers
from the synthetic ground truth. It is NOT a model and generates nothing.

`lvr generate-qa recipes/demo/generate_qa.toml` needs a reasoning LLM (the paper used
DeepSeek-R1) behind an OpenAI-compatible endpoint. Offline, this server plays that part for
the synthetic videos of `lvr synth`: it serves `POST /v1/chat/completions` (and
`GET /v1/models`) on 127.0.0.1 and answers the three prompts of the data pipeline by
looking the answer up in `<data>/train.jsonl`, `<data>/eval.jsonl` and
`<data>/captions_ref.jsonl`:

- generate-qa (a `Category: <name>` line): the ground-truth questions of that category
  for the video named by a `Video: <id>` line, else the video whose reference captions
  the prompt quotes; as `{"questions": [...]}` after a `<think>` block, in a ```json fence
  (the form a reasoning model replies in, so the tolerant parser is exercised);
- refine (`Question:` / `Answer:` / `Reasoning:` lines): `{"reasoning": ...}`, the
  ground-truth reasoning of that question;
- grounding (a `Frame size: WxH` line and a `Time: mm:ss` line): `[{"label", "box"}]`
  with the agent's place at that time (a quadrant or the centre), read from the reference captions.

Faults can be injected for tests: per key (`<video_id>/<category>`, `refine:<video_id>` or
`ground:<video_id>`), a list of faults consumed one per request, and `fault_every=k`
makes every k-th reply invalid JSON. Faults: `no_json`, `think_decoy` (a JSON-looking
draft inside the think block, the real answer in the fence after it), `wrong_letter`,
`three_options`, `empty`, `duplicate` (the first question again, upper-cased),
`contradict` (refine: a reasoning naming another letter), `http500`.

    python -m stages.data.gt_server --data runs/demo/data --port 8765
"""

from __future__ import annotations

import argparse
import json
import re
import threading
import time
from collections import defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

PLACE_BOXES = {  # fractions of the frame: x0, y0, x1, y1
    "top-left": (0.0, 0.0, 0.5, 0.5), "top-right": (0.5, 0.0, 1.0, 0.5),
    "bottom-left": (0.0, 0.5, 0.5, 1.0), "bottom-right": (0.5, 0.5, 1.0, 1.0),
    "centre": (0.25, 0.25, 0.75, 0.75),
}
_PHASE = re.compile(r"(\d+:\d+(?:\.\d+)?)-(\d+:\d+(?:\.\d+)?) the black (\w+) ([^;.]*)")
_PLACE = re.compile(r"\b(top-left|top-right|bottom-left|bottom-right|centre)\b")


def _seconds(stamp: str) -> float:
    total = 0.0
    for part in stamp.split(":"):
        total = total * 60 + float(part)
    return total


class GroundTruth:
    """The synthetic dataset's answers, indexed for lookup."""

    def __init__(self, data_dir: Path, splits: tuple[str, ...] = ("train", "eval")):
        data_dir = Path(data_dir)
        self.questions: dict[tuple[str, str], list[dict]] = defaultdict(list)
        self.by_question: dict[tuple[str, str], dict] = {}
        for split in splits:
            path = data_dir / f"{split}.jsonl"
            if not path.exists():
                continue
            for line in path.read_text().splitlines():
                if line.strip():
                    rec = json.loads(line)
                    self.questions[(rec["video_id"], rec["category"])].append(rec)
                    self.by_question[(rec["video_id"], " ".join(rec["question"].split()))] = rec
        self.captions: dict[str, dict] = {}
        captions = data_dir / "captions_ref.jsonl"
        if captions.exists():
            for line in captions.read_text().splitlines():
                if line.strip():
                    rec = json.loads(line)
                    self.captions[rec["video_id"]] = rec
        if not self.questions:
            raise FileNotFoundError(f"{data_dir}: no {'/'.join(splits)}.jsonl with questions (run `lvr synth` first)")

    def find_video(self, prompt: str) -> str | None:
        m = re.search(r"^\s*Video:\s*(\S+)", prompt, re.MULTILINE)
        if m and (m.group(1) in self.captions or any(v == m.group(1) for v, _ in self.questions)):
            return m.group(1)
        for video_id, rec in self.captions.items():
            if rec["clips"] and rec["clips"][0]["caption"] in prompt:
                return video_id
        return None

    def agent_box(self, video_id: str, t_s: float) -> tuple[str, tuple[float, ...]] | None:
        """`(label, fractional box)` of the agent's quadrant at `t_s`, from the reference captions."""
        rec = self.captions.get(video_id)
        if rec is None:
            return None
        for clip in rec["clips"]:
            for m in _PHASE.finditer(clip["caption"]):
                start, end = _seconds(m.group(1)), _seconds(m.group(2))
                places = _PLACE.findall(m.group(4))  # "moves from A to B": [A, B]; else [where]
                if start <= t_s <= end and places:
                    where = places[0] if len(places) > 1 and t_s < (start + end) / 2 else places[-1]
                    return f"black {m.group(3)}", PLACE_BOXES[where]
        return None


class GTServer:
    """The stand-in server; `start()` returns its base URL (`http://127.0.0.1:<port>/v1`)."""

    def __init__(self, data_dir, port: int = 0, splits=("train", "eval"), faults: dict | None = None,
                 fault_every: int = 0, delay_s: float = 0.0):
        self.truth = GroundTruth(Path(data_dir), tuple(splits))
        self.faults = {k: list(v) for k, v in (faults or {}).items()}
        self.fault_every = fault_every
        self.delay_s = delay_s
        self.log: list[dict] = []  # one entry per request: kind, key, fault, prompt
        self._lock = threading.Lock()
        self._count = 0
        self._httpd = _Server(("127.0.0.1", port), _handler(self))
        self._httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    def start(self) -> str:
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), name="gt-server", daemon=True)
        self._thread.start()
        return self.url

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> "GTServer":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- answering -----------------------------------------------------------------------------
    def _next_fault(self, key: str) -> str | None:
        with self._lock:
            self._count += 1
            queue = self.faults.get(key)
            if queue:
                return queue.pop(0)
            if self.fault_every and self._count % self.fault_every == 0:
                return "no_json"
        return None

    def answer(self, body: dict) -> tuple[int, str]:
        """`(HTTP status, reply text or error message)` for one chat request."""
        prompt = "\n".join(_text_of(m.get("content")) for m in body.get("messages", []) if m.get("role") == "user")
        video_id = self.truth.find_video(prompt)
        category = re.search(r"^\s*Category:\s*(\w+)", prompt, re.MULTILINE)
        if category:
            kind, key = "qa", f"{video_id}/{category.group(1)}"
        elif re.search(r"^\s*Frame size:\s*\d+x\d+", prompt, re.MULTILINE):
            kind, key = "ground", f"ground:{video_id}"
        elif re.search(r"^\s*Reasoning:", prompt, re.MULTILINE):
            kind, key = "refine", f"refine:{video_id}"
        else:
            kind, key = "other", "other"
        fault = self._next_fault(key)
        with self._lock:
            self.log.append({"kind": kind, "key": key, "fault": fault, "prompt": prompt})
        if self.delay_s:
            time.sleep(self.delay_s)
        if fault == "http500":
            return 500, "injected server error"
        if fault == "no_json":
            return 200, "<think>I am not sure what to do.</think>I cannot answer that in the requested format."
        if kind == "other" or video_id is None:
            return 200, "I can only answer the prompts of the lvr data pipeline about a known synthetic video."
        if kind == "qa":
            return 200, self._qa_reply(video_id, category.group(1), prompt, fault)
        if kind == "refine":
            return 200, self._refine_reply(video_id, prompt, fault)
        return 200, self._ground_reply(video_id, prompt)

    def _qa_reply(self, video_id: str, category: str, prompt: str, fault: str | None) -> str:
        n = re.search(r"\bWrite (\d+)\b", prompt)
        count = int(n.group(1)) if n else 1
        items = []
        for rec in self.truth.questions.get((video_id, category), [])[:count]:
            item = {"question": rec["question"], "options": dict(rec["options"]), "answer": rec["answer"],
                    "reasoning": rec["reasoning"], "source_clips": rec.get("source_clips", [])}
            if fault == "wrong_letter":
                item["answer"] = "E"
            elif fault == "three_options":
                item["options"].pop("D", None)
            items.append(item)
        if fault == "empty":
            items = []
        elif fault == "duplicate" and items:
            items = [items[0], dict(items[0], question=items[0]["question"].upper() + "!!")] + items[1:]
        body = json.dumps({"questions": items}, indent=1)
        think = f"<think>Looking up the ground truth of {video_id}, category {category}.</think>"
        if fault == "think_decoy":
            think = '<think>A first draft: {"questions": [{"question": "draft"}]} -- no, check again.</think>'
        return f"{think}\nHere are the questions.\n```json\n{body}\n```"

    def _refine_reply(self, video_id: str, prompt: str, fault: str | None) -> str:
        q = re.search(r"^\s*Question:\s*(.+)$", prompt, re.MULTILINE)
        r = re.search(r"^\s*Reasoning:\s*(.+)$", prompt, re.MULTILINE)
        rec = self.truth.by_question.get((video_id, " ".join(q.group(1).split()))) if q else None
        reasoning = rec["reasoning"] if rec else (r.group(1).strip() if r else "")
        if fault == "contradict" and rec:
            other = next(letter for letter in "ABCD" if letter != rec["answer"])
            reasoning = f"Looking again, the answer is {other}."
        return f"<think>Tightening the reasoning.</think>\n```json\n{json.dumps({'reasoning': reasoning})}\n```"

    def _ground_reply(self, video_id: str, prompt: str) -> str:
        size = re.search(r"^\s*Frame size:\s*(\d+)x(\d+)", prompt, re.MULTILINE)
        when = re.search(r"^\s*Time:\s*(\d+:\d+(?::\d+)?(?:\.\d+)?)", prompt, re.MULTILINE)
        width, height = int(size.group(1)), int(size.group(2))
        found = self.truth.agent_box(video_id, _seconds(when.group(1))) if when else None
        boxes = []
        if found:
            label, (x0, y0, x1, y1) = found
            boxes.append({"label": label, "box": [round(x0 * width), round(y0 * height),
                                                  round(x1 * width), round(y1 * height)]})
        return f"```json\n{json.dumps(boxes)}\n```"


class _Server(ThreadingHTTPServer):
    request_queue_size = 128  # the default 5 drops SYNs under a burst of clients: 1 s retransmit stalls


def _text_of(content) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return ""


def _handler(server: GTServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True  # headers and body go out in two writes: no 40 ms stall

        def log_message(self, *args) -> None:  # quiet: the log list records requests
            pass

        def _send(self, status: int, payload: dict) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            if self.path.rstrip("/") == "/v1/models":
                self._send(200, {"object": "list", "data": [{"id": "gt-stand-in", "object": "model"}]})
            else:
                self._send(404, {"error": {"message": f"no route {self.path}"}})

        def do_POST(self) -> None:
            if self.path.rstrip("/") != "/v1/chat/completions":
                self._send(404, {"error": {"message": f"no route {self.path}"}})
                return
            try:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
            except ValueError:
                self._send(400, {"error": {"message": "body is not JSON"}})
                return
            status, text = server.answer(body)
            if status != 200:
                self._send(status, {"error": {"message": text}})
                return
            self._send(200, {
                "id": f"gt-{server._count}", "object": "chat.completion", "model": body.get("model", "gt"),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
            })

    return Handler


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="The demo's ground-truth stand-in for a reasoning LLM (not a model).")
    parser.add_argument("--data", default="runs/demo/data", help="output folder of `lvr synth`")
    parser.add_argument("--port", type=int, default=8765, help="0 picks a free port")
    parser.add_argument("--splits", default="train,eval", help="which question files to answer from")
    parser.add_argument("--fault-every", type=int, default=0, help="every k-th reply is not JSON (tests)")
    parser.add_argument("--delay-s", type=float, default=0.0, help="seconds to wait before each reply")
    args = parser.parse_args(argv)
    server = GTServer(args.data, port=args.port, splits=tuple(s for s in args.splits.split(",") if s),
                      fault_every=args.fault_every, delay_s=args.delay_s)
    print(server.url, flush=True)
    try:
        server._httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server._httpd.server_close()


if __name__ == "__main__":
    main()
