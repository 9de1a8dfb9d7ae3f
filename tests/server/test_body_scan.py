"""The body-scan worker process (server/body_scan.py): it counts a large body's prompt
characters off the API process's GIL, and a killed worker falls back to a thread."""

import asyncio
import json
import os
import signal

import psutil

from server.body_scan import BodyScanner, prompt_chars


def test_prompt_chars_of_completions_and_chat_bodies():
    assert prompt_chars(json.dumps({"prompt": ["ab", "cde", [1, 2]]}).encode(),
                        "/v1/completions") == 5
    chat = {"messages": [{"role": "user", "content": "hello"},
                         {"role": "user", "content": [{"type": "text", "text": "abc"}]}]}
    assert prompt_chars(json.dumps(chat).encode(), "/v1/chat/completions") == 8
    assert prompt_chars(b"[1, 2]", "/v1/completions") is None
    assert prompt_chars(b"{not json", "/v1/completions") is None
    # A lone surrogate: orjson refuses it, json reads it; the app then decides.
    assert prompt_chars(b'{"prompt": "\\ud800x"}', "/v1/completions") == 2


def test_the_worker_counts_in_its_own_process_and_a_killed_worker_falls_back_to_a_thread():
    async def run():
        scanner = BodyScanner()
        scanner.start()
        body = json.dumps({"prompt": "x" * 3_000_000}).encode()
        try:
            assert await scanner.prompt_chars(body, "/v1/completions") == 3_000_000
            workers = [p for p in psutil.Process().children()
                       if "spawn_main" in " ".join(p.cmdline())]
            assert len(workers) == 1
            os.kill(workers[0].pid, signal.SIGKILL)
            workers[0].wait(10)
            assert await scanner.prompt_chars(body, "/v1/completions") == 3_000_000
            assert await scanner.prompt_chars(body, "/v1/completions") == 3_000_000
        finally:
            scanner.shutdown()

    asyncio.run(run())
