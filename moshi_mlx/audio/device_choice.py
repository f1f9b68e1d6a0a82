"""Which sound devices exist and which to use (sounddevice / PortAudio), with one-line errors.

* :func:`list_devices` prints the devices; :func:`find_device` picks one by index, by (part of) its name
  or the default; :func:`pick_rate` finds a rate the device takes (24 kHz, else a common one).
* Every failure becomes a one-line :class:`AudioDeviceError`; :class:`NoDefaultDevice` when there is
  no sound card at all, so the commands can say what to do instead.
* :func:`sounddevice_module` is the one place sounddevice is imported (tests put a fake there).
"""

from __future__ import annotations

import contextlib
import os
import sys

from ..errors import DEBUG_ENV, MoshiError, first_line
from .frames import SAMPLE_RATE

#: Rates tried, in order, when a device cannot run at 24 kHz (after its own default rate).
FALLBACK_RATES = (48_000, 44_100, 32_000, 96_000, 16_000, 88_200, 22_050)


class AudioDeviceError(MoshiError, RuntimeError):
    """A sound device problem (missing PortAudio, unknown or unsuitable device, stream failure): one line."""


class NoDefaultDevice(AudioDeviceError):
    """No device was named and there is no default one (typically: no sound card); front ends add what to do."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@contextlib.contextmanager
def _quiet_stderr():
    """Silence C-level stderr (libjack's "Cannot connect to server", ALSA probing chatter) meanwhile.

    Set MOSHI_MLX_DEBUG=1 to see that output.
    """
    if os.environ.get(DEBUG_ENV):
        yield
        return
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):
        yield
        return
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def sounddevice_module():
    """Import sounddevice (PortAudio scans the devices then), turning a missing PortAudio into one line."""
    if "sounddevice" in sys.modules:
        return sys.modules["sounddevice"]
    try:
        with _quiet_stderr():
            import sounddevice
    except OSError as e:  # raised by sounddevice when libportaudio cannot be loaded
        raise AudioDeviceError(
            f"{first_line(e)}: install PortAudio "
            "(Debian/Ubuntu: apt install libportaudio2; macOS: brew install portaudio)"
        ) from None
    except ImportError as e:
        raise AudioDeviceError(f"sounddevice is not installed ({e}); pip install sounddevice") from None
    return sounddevice


def release_portaudio() -> None:
    """Terminate PortAudio now if sounddevice was loaded (it otherwise does so at interpreter exit).

    For entry points that leave with ``os._exit``: sound servers such as JACK keep a client that
    vanished without closing in their graph and stall on it later.
    """
    sd = sys.modules.get("sounddevice")
    terminate = getattr(sd, "_terminate", None)  # sounddevice's own atexit handler uses it
    if terminate is None:
        return
    try:
        while getattr(sd, "_initialized", 0) > 0:
            terminate()
    except Exception:
        pass


_KINDS = {"input": "max_input_channels", "output": "max_output_channels"}


def _query(sd) -> list[dict]:
    try:
        return list(sd.query_devices())
    except Exception as e:
        raise AudioDeviceError(f"cannot list sound devices: {first_line(e)}") from None


def list_devices(if_none: str = "") -> str:
    """A readable table of the sound devices; ``>`` marks the default input, ``<`` the default output.

    With no device at all, one line, followed by ``if_none`` (the front end's advice on what to do instead).
    """
    sd = sounddevice_module()
    devices = _query(sd)
    if not devices:
        return "no sound devices found (PortAudio sees none)" + (f"; {if_none}" if if_none else "")
    try:
        hostapis = [h["name"] for h in sd.query_hostapis()]
    except Exception:
        hostapis = []
    default_in, default_out = (_default_index(sd, k) for k in ("input", "output"))
    lines = []
    for i, d in enumerate(devices):
        mark = (">" if i == default_in else " ") + ("<" if i == default_out else " ")
        api = hostapis[d["hostapi"]] if d["hostapi"] < len(hostapis) else "?"
        lines.append(
            f"{mark} {i:2d} {d['name']} ({api}; {d['max_input_channels']} in, {d['max_output_channels']} out; "
            f"{d['default_samplerate']:.0f} Hz)"
        )
    lines.append("  (> default input, < default output)")
    return "\n".join(lines)


def _default_index(sd, kind: str) -> int:
    try:
        dev = sd.default.device[0 if kind == "input" else 1]
        if dev is None or (isinstance(dev, int) and dev < 0):
            return sd.query_devices(kind=kind)["index"]
        return dev if isinstance(dev, int) else sd.query_devices(dev, kind=kind)["index"]
    except Exception:
        return -1


def find_device(spec: int | str | None, kind: str) -> int:
    """The index of the ``kind`` ("input" or "output") device chosen by index, (part of) a name, or default.

    Names match case-insensitively; an exact name wins over a partial one; a partial name that fits
    several devices is an error naming them.
    """
    if kind not in _KINDS:
        raise ValueError(f"kind must be 'input' or 'output', got {kind!r}")
    sd = sounddevice_module()
    devices = _query(sd)
    chans = _KINDS[kind]
    flag = f"--{kind}-device"
    if spec is None or (isinstance(spec, str) and not spec.strip()):
        idx = _default_index(sd, kind)
        if idx < 0 or idx >= len(devices) or devices[idx][chans] < 1:
            what = "microphone" if kind == "input" else "speaker"
            raise NoDefaultDevice(kind, f"no {what} found (no default {kind} device): pick one with {flag} (see --list-devices)")
        return idx
    if isinstance(spec, int) or (isinstance(spec, str) and spec.strip().lstrip("-").isdigit()):
        idx = int(spec)
        if not 0 <= idx < len(devices):
            raise AudioDeviceError(f"{flag} {idx}: no such device (there are {len(devices)}; see --list-devices)")
        if devices[idx][chans] < 1:
            raise AudioDeviceError(f"{flag} {idx}: '{devices[idx]['name']}' has no {kind} channels")
        return idx
    want = spec.strip().lower()
    usable = [i for i, d in enumerate(devices) if d[chans] > 0]
    exact = [i for i in usable if devices[i]["name"].lower() == want]
    partial = exact or [i for i in usable if want in devices[i]["name"].lower()]
    if len(partial) == 1:
        return partial[0]
    if partial:
        names = ", ".join(f"{i} '{devices[i]['name']}'" for i in partial[:4])
        raise AudioDeviceError(f"{flag} {spec!r} matches several {kind} devices ({names}); use its index")
    if any(want in d["name"].lower() for d in devices):
        raise AudioDeviceError(f"{flag} {spec!r}: that device has no {kind} channels (see --list-devices)")
    raise AudioDeviceError(f"{flag} {spec!r}: no such {kind} device (see --list-devices)")


def pick_rate(device: int, kind: str) -> int:
    """24 kHz if the device takes it, else its default rate, else the first common rate it accepts."""
    sd = sounddevice_module()
    check = sd.check_input_settings if kind == "input" else sd.check_output_settings
    info = sd.query_devices(device)
    candidates = [SAMPLE_RATE, int(info["default_samplerate"]), *FALLBACK_RATES]
    last_err = None
    for rate in dict.fromkeys(r for r in candidates if r > 0):
        try:
            check(device=device, samplerate=rate, channels=1, dtype="float32")
            return rate
        except Exception as e:  # PortAudioError / ValueError: "Invalid sample rate", ...
            last_err = e
    from .silence import microphone_refused  # macOS's permission refusal reads as a format problem otherwise

    refused = microphone_refused(last_err) if kind == "input" else None
    if refused is not None:
        raise AudioDeviceError(refused)
    raise AudioDeviceError(
        f"{kind} device {device} '{info['name']}' accepts no usable mono float32 format ({first_line(last_err)})"
    )
