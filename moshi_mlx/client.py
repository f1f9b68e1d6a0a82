"""Talk to a Moshi server on another machine: ``python -m moshi_mlx.client [URL]``.

The terminal app's parts (:class:`~moshi_mlx.audio.devices.DuplexAudio` with echo cancellation, the live
transcript and lag line of :mod:`moshi_mlx.cli.terminal`) around :class:`~moshi_mlx.net.remote.RemoteConversation`
instead of a local model. Works with any server speaking Kyutai's WebSocket protocol: ours
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
import signal
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from . import cli
from .audio.devices import DuplexAudio, NoDefaultDevice
from .audio.frames import FRAME_S
from .cli import sigint_ignored, signal_name
from .cli.terminal import (
    Display,
    add_audio_args,
    add_record_arg,
    echo_summary,
    exit_now,
    lag_status,
    log,
    make_echo_canceller,
    make_recorder,
    run_app,
    save_recording,
)
from .errors import error_line
from .net.remote import (
    DEFAULT_URL,
    ClientError,
    ConnectionLost,
    RemoteConversation,
    ServerRefused,
    chat_url,
    sampling_params,
)

if TYPE_CHECKING:
    from .audio.recording import ConversationRecorder

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
    cli.add_verbose_arg(p)
    add_record_arg(add_audio_args(p))
    return p


@dataclass
class _Totals:
    """Counts over every connection of the session (reconnects included)."""

    sent: int = 0
    received: int = 0
    dropped_here: int = 0
    connections: int = 0
    latencies: list[float] = field(default_factory=list)

    def add(self, conv: RemoteConversation) -> None:
        st = conv.stats
        self.sent += st.frames_sent
        self.received += st.frames_received
        self.dropped_here += st.frames_dropped
        self.latencies += list(st.latencies_ms)


class _Session:
    """Audio devices open once; connections come and go (reconnects)."""

    def __init__(
        self, args: argparse.Namespace, audio: DuplexAudio, url, ssl_context, recorder: ConversationRecorder | None
    ) -> None:
        self.args, self.audio, self.url, self.ssl_context = args, audio, url, ssl_context
        self.recorder = recorder
        self.model = "?"  # from the server's info message, for the recording
        self.display = Display()
        self.conv: RemoteConversation | None = None
        self.totals = _Totals()
        self.interrupted = False
        self.stopped_by = "Ctrl-C"  # or the signal that set _stop
        self.started = time.monotonic()
        self._warned_drops = 0
        self._last_warn = 0.0
        self._stop: asyncio.Event | None = None

    def push(self, frame) -> None:  # PortAudio's thread
        conv = self.conv
        if conv is not None:
            if self.recorder is not None:  # only while connected: both sides are recorded together
                self.recorder.add_user(frame)
            conv.push_mic(frame)

    def played(self, frame) -> None:  # PortAudio's thread: Moshi's side as it goes to the speaker
        if self.recorder is not None and self.conv is not None:
            self.recorder.add_moshi(frame)

    def _on_text(self, piece: str) -> None:
        self.display.text(piece)
        if self.recorder is not None:
            self.recorder.add_text(piece)

    def _on_info(self, info: dict) -> None:
        if info.get("type") == "info":
            model = self.model = str(info.get("model") or "?")
            demo = " (demo model: it babbles)" if info.get("demo") else ""
            self.display.message(f"server: {info.get('server', '?')}, model {model}{demo}")

    def _new_conversation(self) -> RemoteConversation:
        return RemoteConversation(
            self.url, on_audio=self.audio.play, on_text=self._on_text, on_notice=self.display.message,
            on_info=self._on_info, ssl_context=self.ssl_context, max_unsent=self.args.max_lag_frames,
            connect_timeout=self.args.connect_timeout,
        )

    async def _until_stopped(self, coro):
        """Run ``coro`` unless Ctrl-C comes first (then None, with the task cancelled)."""
        task = asyncio.ensure_future(coro)
        stopper = asyncio.ensure_future(self._stop.wait())
        try:
            await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopper.cancel()
        if task.done():
            return task.result()
        task.cancel()
        try:
            await task
        except (asyncio.CancelledError, Exception):
            pass
        return None

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        handled = []
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                old = signal.getsignal(sig)
                try:
                    loop.add_signal_handler(sig, self._on_signal, sig)
                    handled.append((sig, old))
                except (NotImplementedError, RuntimeError, ValueError):
                    pass
        try:
            await self._converse()
        finally:
            for sig, old in handled:
                loop.remove_signal_handler(sig)
                signal.signal(sig, old)  # asyncio would leave the default, not main()'s SIGTERM handler
            if self.conv is not None:
                await self.conv.close()

    def _on_signal(self, signum: int) -> None:
        if not self._stop.is_set():  # the first signal is what stopped the session
            self.stopped_by = signal_name(signum)
        self._stop.set()

    async def _converse(self) -> None:
        failures = 0
        while True:
            conv = self._new_conversation()
            try:
                handshake = await self._until_stopped(conv.connect())
            except ClientError as e:
                # A refusal (busy, origin, TLS) is the server's answer: asking again at once will not change it.
                if (self.totals.connections == 0 or not self.args.reconnect or isinstance(e, ServerRefused)
                        or failures + 1 >= RECONNECT_TRIES):
                    raise
                failures += 1
                self.display.message(f"{error_line(e)}; trying again ({failures}/{RECONNECT_TRIES - 1})")
                if await self._until_stopped(asyncio.sleep(RECONNECT_PAUSE_S * failures)) is None and self._stop.is_set():
                    self.interrupted = True
                    return
                continue
            if handshake is None:  # Ctrl-C while connecting
                self.interrupted = True
                return
            failures = 0
            self.totals.connections += 1
            self.conv = conv
            self.display.message(f"connected to {conv.url.with_query(None)}")
            if not self.audio.active:
                self.audio.start()
                self.display.message("listening: speak to Moshi (Ctrl-C to quit)")
            lost = await self._talk(conv)
            self.conv = None
            self.totals.add(conv)
            await conv.close()
            self.audio.clear()  # Moshi's last words from a dead connection are stale
            if lost is None:
                return
            self.display.message(error_line(lost))
            if not await self._want_reconnect():
                raise ConnectionLost(f"{lost}; run the same command again to reconnect (or pass --reconnect)")

    async def _talk(self, conv: RemoteConversation) -> ConnectionLost | None:
        """Until Ctrl-C (None) or the connection is lost (the error)."""
        task = asyncio.ensure_future(conv.run())
        stopper = asyncio.ensure_future(self._stop.wait())
        try:
            while True:
                done, _ = await asyncio.wait({task, stopper}, timeout=0.1, return_when=asyncio.FIRST_COMPLETED)
                self._show_status(conv)
                if stopper in done:
                    self.interrupted = True
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
        self.display.message("reconnect? [Y/n] ")
        loop = asyncio.get_running_loop()
        # input() cannot be cancelled; on Ctrl-C the thread is left behind (the process exits right after)
        answer = await self._until_stopped(loop.run_in_executor(None, sys.stdin.readline))
        if answer is None:
            self.interrupted = True
            return False
        return answer.strip().lower() in ("", "y", "yes")

    def _show_status(self, conv: RemoteConversation) -> None:
        now = time.monotonic()
        st = conv.stats
        lag_ms = st.last_latency_ms + self.audio.queued_frames * FRAME_S * 1e3
        dropped = self.totals.dropped_here + st.frames_dropped + self.audio.stats.overflows + st.server_dropped
        self.display.set_status(lag_status(lag_ms, dropped, self.audio.stats.underruns), now)
        if dropped > self._warned_drops and now - self._last_warn >= 2.0:
            self.display.message(
                f"behind real time: skipped {dropped} frames so far ({dropped * FRAME_S:.1f} s of audio; "
                f"{st.frames_dropped + self.totals.dropped_here} of your mic, {self.audio.stats.overflows} of "
                f"Moshi's late audio here, {st.server_dropped} at the server); lag {lag_ms:.0f} ms"
            )
            self._warned_drops, self._last_warn = dropped, now

    def summary(self) -> str:
        t = self.totals
        lat = t.latencies
        lat_txt = f", latency median {statistics.median(lat):.0f} ms / max {max(lat):.0f} ms" if lat else ""
        dropped = t.dropped_here + self.audio.stats.overflows
        return (
            f"session: {time.monotonic() - self.started:.1f} s, {t.connections} connection(s), {t.sent} frames sent, "
            f"{t.received} received, {dropped} dropped here ({dropped * FRAME_S:.1f} s), "
            f"{self.audio.stats.underruns} underruns{lat_txt}" + (f" (stopped by {self.stopped_by})" if self.interrupted else "")
        )


def converse(args: argparse.Namespace) -> int:
    from .net.tls import client_context

    url = chat_url(args.url, sampling_params(**{name: getattr(args, name) for name in cli.SAMPLING_PARAMS}))
    ssl_ctx = client_context(args.insecure, args.cafile) if url.scheme == "wss" else None

    # The record folder and the devices are checked before connecting: a mistake should not occupy the server.
    recorder = make_recorder(args.record)
    session: _Session | None = None
    echo_canceller = None if args.no_aec else make_echo_canceller(args.aec_delay_ms)
    try:
        audio = DuplexAudio(
            lambda frame: session.push(frame) if session is not None else None,
            args.input_device, args.output_device, max_queued=args.max_lag_frames + 3, echo_canceller=echo_canceller,
            on_output=lambda frame: session.played(frame) if session is not None else None,
        )
    except NoDefaultDevice as e:
        raise NoDefaultDevice(e.kind, f"{e}; or, {NO_SOUND_HINT}") from None
    log(audio.describe() + (", echo cancellation on" if echo_canceller else ", echo cancellation off"))
    session = _Session(args, audio, url, ssl_ctx, recorder)
    try:
        asyncio.run(session.run())
    finally:  # also on a lost connection: what was said until then is saved
        with sigint_ignored():  # a second Ctrl-C must not break the cleanup
            audio.close()
            session.display.finish()
            if session.totals.connections:
                echo_line = echo_summary(echo_canceller)
                if echo_line is not None:
                    log(echo_line)
                if recorder is not None:
                    save_recording(recorder, args.record, {"model": session.model, "server": str(url.with_query(None))})
                log(session.summary())
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_app(build_parser(), converse, NO_SOUND_HINT, argv)


def console_main() -> None:
    exit_now(main())


if __name__ == "__main__":
    console_main()
