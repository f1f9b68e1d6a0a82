"""Talk to a Moshi server on another machine: ``python -m moshi_mlx.client [URL]``.

The terminal app's :class:`~moshi_mlx.cli.terminal.TerminalSession` (sound devices with echo cancellation,
``--record``, the live transcript and lag line) with a server as its far end: connections of
:class:`~moshi_mlx.net.remote.RemoteConversation` instead of a local model. Works with any server speaking Kyutai's WebSocket protocol: ours
(``local_web``), Kyutai's PyTorch and Rust servers. Sampling flags travel as query parameters; flags
left out keep the server's defaults.

Latency stays bounded both ways: microphone frames the connection cannot take are dropped, oldest
first, and Moshi's frames that arrive too late for the speaker's small buffer are dropped too; both
are counted in the lag line. A connection lost mid-conversation ends with one line, and an offer to
reconnect (a prompt on a terminal, automatic with ``--reconnect``). ``--record DIR`` saves the conversation
(while connected) as the terminal app does, when it ends for any reason.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

import numpy as np

from . import cli
from .audio.frames import FRAME_S
from .cli.async_signals import AsyncStop
from .cli.flags import add_persona_args, persona_from_args
from .cli.terminal import TerminalSession, add_audio_args, add_record_arg, entry_points
from .errors import UsageError, error_line
from .net.address import DEFAULT_URL, chat_url, sampling_params
from .net.protocol import INFO_PATH, ParamError, encode_persona, voice_name
from .net.failures import ClientError, ConnectionLost, ServerRefused
from .net.remote import RemoteConversation

#: Said when there is no sound card: the server's own page works from any browser with a microphone.
NO_SOUND_HINT = (
    "without a sound card here, open the server's address (http:// or https://) in a browser on a device "
    "with a microphone"
)
RECONNECT_TRIES = 5  # --reconnect: consecutive failed attempts before giving up
RECONNECT_PAUSE_S = 1.0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m moshi_mlx.client",
        description="Talk to a Moshi server (ours, or Kyutai's) from this terminal: microphone in, speaker out, "
        "live transcript.",
    )
    p.add_argument("url", nargs="?", default=DEFAULT_URL,
                   help=f"the server, e.g. wss://192.168.1.20:8998 (default {DEFAULT_URL})")
    c = p.add_argument_group("connection")
    c.add_argument("--insecure", action="store_true",
                   help="accept any TLS certificate (e.g. a server's self-signed --ssl auto one; check its fingerprint)")
    c.add_argument("--cafile", metavar="PEM", default=None,
                   help="trust this certificate (e.g. the server's cert.pem) instead of the system's authorities")
    c.add_argument("--connect-timeout", type=cli.number(0.0, open_low=True), default=10.0, metavar="S", help="seconds to wait for the server")
    c.add_argument("--reconnect", action="store_true",
                   help="reconnect by itself when the connection is lost (otherwise: ask on a terminal, else stop)")
    cli.add_sampling_args(p, server_defaults=True)
    add_persona_args(p, remote=True)
    cli.add_verbose_arg(p)
    add_record_arg(add_audio_args(p))
    cli.add_transcribe_user_arg(p)
    cli.add_codec_args(p)  # the Mimi of --transcribe-user's model
    return p


class _Server:
    """The far end of the terminal session: a Moshi server; connections come and go (reconnects)."""

    def __init__(self, args: argparse.Namespace, url, ssl_context) -> None:
        self.args, self.url, self.ssl_context = args, url, ssl_context
        self.session: TerminalSession | None = None  # set right after the devices open
        self.model = "?"  # from the server's info message, for the recording
        self.conv: RemoteConversation | None = None  # the live connection: the mic goes there
        self.connections = 0
        # Counts of the connections that ended (reconnects included).
        self._sent = self._received = self._dropped = 0
        self._latencies: list[float] = []
        self._stop: AsyncStop | None = None  # made on the event loop

    # -- FarEnd -------------------------------------------------------------------------------------
    @property
    def listening(self) -> bool:
        return self.conv is not None

    @property
    def reached(self) -> bool:
        return self.connections > 0

    def push(self, frame: np.ndarray) -> None:  # PortAudio's thread
        conv = self.conv
        if conv is not None:
            conv.push_mic(frame)

    def close(self) -> None:
        pass  # connections are closed on the event loop, in run()

    def counts(self) -> str:
        dropped = self._dropped + self.session.audio.stats.overflows
        return (
            f"{self.connections} connection(s), {self._sent} frames sent, {self._received} received, "
            f"{dropped} dropped here ({dropped * FRAME_S:.1f} s)"
        )

    def latencies(self) -> list[float]:
        return self._latencies

    def recording_info(self) -> dict[str, Any]:
        return {"model": self.model, "server": str(self.url.with_query(None))}

    # -- connections ----------------------------------------------------------------------------------
    def _add_totals(self, conv: RemoteConversation) -> None:
        st = conv.stats
        self._sent += st.frames_sent
        self._received += st.frames_received
        self._dropped += st.frames_dropped
        self._latencies += list(st.latencies_ms)

    def _on_info(self, info: dict) -> None:
        if info.get("type") == "info":
            model = self.model = str(info.get("model") or "?")
            demo = " (demo model: it babbles)" if info.get("demo") else ""
            self.session.message(f"server: {info.get('server', '?')}, model {model}{demo}")

    def _new_conversation(self) -> RemoteConversation:
        return RemoteConversation(
            self.url, on_audio=self.session.play, on_text=self.session.text, on_notice=self.session.message,
            on_info=self._on_info, ssl_context=self.ssl_context, max_unsent=self.args.max_lag_frames,
            connect_timeout=self.args.connect_timeout,
        )

    def _interrupted(self) -> None:
        self.session.stopped_by = self._stop.by

    async def run(self) -> None:
        self._stop = AsyncStop()
        with self._stop.handling():
            try:
                await self._converse()
            finally:
                if self.conv is not None:
                    await self.conv.close()

    async def _connect(self, conv: RemoteConversation, failures: int) -> bool | None:
        """True once connected; False to try again (--reconnect); None on Ctrl-C."""
        try:
            handshake = await self._stop.until_stopped(conv.connect())
        except ClientError as e:
            # A refusal (busy, origin, TLS) is the server's answer: asking again at once will not change it.
            if (self.connections == 0 or not self.args.reconnect or isinstance(e, ServerRefused)
                    or failures + 1 >= RECONNECT_TRIES):
                raise
            self.session.message(f"{error_line(e)}; trying again ({failures + 1}/{RECONNECT_TRIES - 1})")
            await self._stop.until_stopped(asyncio.sleep(RECONNECT_PAUSE_S * (failures + 1)))
            if self._stop.requested:
                return None
            return False
        return None if handshake is None else True

    async def _converse(self) -> None:
        failures = 0
        while True:
            conv = self._new_conversation()
            connected = await self._connect(conv, failures)
            if connected is None:  # Ctrl-C while connecting or waiting to retry
                self._interrupted()
                return
            if not connected:
                failures += 1
                continue
            failures = 0
            self.connections += 1
            self.conv = conv
            self.session.message(f"connected to {conv.url.with_query(None)}")
            if not self.session.audio.active:
                self.session.start_listening()
            lost = await self._talk(conv)
            self.conv = None
            self._add_totals(conv)
            await conv.close()
            self.session.audio.clear()  # Moshi's last words from a dead connection are stale
            if lost is None:
                return
            self.session.message(error_line(lost))
            if not await self._want_reconnect():
                raise ConnectionLost(f"{lost}; run the same command again to reconnect (or pass --reconnect)")

    async def _talk(self, conv: RemoteConversation) -> ConnectionLost | None:
        """Until Ctrl-C (None) or the connection is lost (the error)."""
        task = asyncio.ensure_future(conv.run())
        stopper = asyncio.ensure_future(self._stop.event.wait())
        try:
            while True:
                done, _ = await asyncio.wait({task, stopper}, timeout=0.1, return_when=asyncio.FIRST_COMPLETED)
                self._show_lag(conv)
                if stopper in done:
                    self._interrupted()
                    self.conv = None  # the microphone (and the recording) stop here, not when the close is done
                    await conv.close()
                    await asyncio.wait({task}, timeout=3.0)
                    return None
                if task in done:
                    error = task.exception()
                    if isinstance(error, ConnectionLost):
                        return error
                    if error is not None:
                        raise error
                    return None
        finally:
            stopper.cancel()
            if not task.done():
                task.cancel()

    async def _want_reconnect(self) -> bool:
        if self.args.reconnect:
            return True
        if not sys.stdin.isatty():
            return False
        self.session.message("reconnect? [Y/n] ")
        loop = asyncio.get_running_loop()
        # input() cannot be cancelled; on Ctrl-C the thread is left behind (the process exits right after)
        answer = await self._stop.until_stopped(loop.run_in_executor(None, sys.stdin.readline))
        if answer is None:
            self._interrupted()
            return False
        return answer.strip().lower() in ("", "y", "yes")

    def _show_lag(self, conv: RemoteConversation) -> None:
        st, overflows = conv.stats, self.session.audio.stats.overflows
        mine = st.frames_dropped + self._dropped

        def warning(dropped: int, lag_ms: float) -> str:
            return (
                f"behind real time: skipped {dropped} frames so far ({dropped * FRAME_S:.1f} s of audio; "
                f"{mine} of your mic, {overflows} of Moshi's late audio here, {st.server_dropped} at the server); "
                f"lag {lag_ms:.0f} ms"
            )

        self.session.show_lag(st.last_latency_ms, mine + overflows + st.server_dropped, warning)


def persona_params(args: argparse.Namespace) -> dict[str, str]:
    """--text-prompt / --text-prompt-file / --voice as the query's text_prompt and voice_prompt (one line if not)."""
    persona = persona_from_args(args)
    voice = persona["voice"]
    try:
        if voice is not None:
            voice_name(voice)
    except ParamError:
        raise UsageError(f"--voice {voice[:60]!r}: a server's voice is one of its presets, by name (its "
                         f"{INFO_PATH} lists them); a recording stays on this machine") from None
    try:
        return encode_persona(persona["text_prompt"], voice)
    except ParamError as e:
        raise UsageError(f"--text-prompt: {e}") from None


def converse(args: argparse.Namespace) -> int:
    from .net.tls import client_context

    url = chat_url(args.url, {**sampling_params(**{name: getattr(args, name) for name in cli.SAMPLING_PARAMS}),
                              **persona_params(args)})
    ssl_ctx = client_context(args.insecure, args.cafile) if url.scheme == "wss" else None
    want_stt, stt_resolved = cli.resolve_user_stt(args)  # a bad REPO: one line before anything loads
    # The record folder and the devices are checked before connecting: a mistake should not occupy the server.
    server = _Server(args, url, ssl_ctx)
    server.session = TerminalSession(args, server, NO_SOUND_HINT)
    if want_stt:  # the user's words, written down here (the server only sees audio)
        stt = cli.load_user_stt(args, stt_resolved, log=cli.say)
        cli.say(f"your words: {stt.description}; {stt.memory_note()}")
        server.session.attach_user_transcriber(stt)
    # also on a lost connection: what was said until then is saved, and summed up
    return server.session.run(lambda: asyncio.run(server.run()), summary_on_error=True)


#: ``main(argv) -> exit code``; ``console_main()``: the command line's entry (``main()``, then a quick exit).
main, console_main = entry_points(build_parser, converse, NO_SOUND_HINT)

if __name__ == "__main__":
    console_main()
