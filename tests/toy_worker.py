"""A model worker of the tests' own making, for the toy serving backend (tests/toy_plugins.py): every request is
answered with one fixed reply, served through fastchat.serve.base_worker as our real workers are (the controller
protocol, --port 0 --port-file, registration of its own bound address).

    python -m tests.toy_worker --reply TEXT --model-names toy --port 0 --port-file F --controller-address URL
"""
from __future__ import annotations

import argparse

from fastchat.serve.base_worker import Worker, add_worker_args, build_app, worker_socket
from fastchat.serve.hosts import serve


class FixedReply:
    """The backend: every generation is the reply, in one chunk; a token is a whitespace-separated word."""
    context_len = 256

    def __init__(self, reply: str):
        self.reply = reply

    def queue_length(self) -> int:
        return 0

    def count_tokens(self, prompt: str) -> int:
        return len(prompt.split())

    async def agenerate_stream(self, params: dict):
        prompt, completion = self.count_tokens(params.get("prompt", "")), self.count_tokens(self.reply)
        usage = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
        yield {"text": self.reply, "error_code": 0, "finish_reason": "stop", "usage": usage}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_worker_args(p)
    p.add_argument("--reply", required=True)
    a = p.parse_args(argv)
    sock = worker_socket(a)
    worker = Worker(FixedReply(a.reply), a.model_names.split(","), a.worker_address or f"http://{a.host}:{a.port}",
                    a.controller_address, heart_beat_interval=a.heart_beat_interval)
    serve(build_app(worker), sock, a.port_file)


if __name__ == "__main__":
    main()
