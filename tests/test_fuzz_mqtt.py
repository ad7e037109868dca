"""The MQTT fuzz target (tests/fuzz/fuzz_mqtt.py) runs clean for a short while on its seed corpus,
and the codec bugs that fuzzing and probing found (now fixed) stay here as regression tests."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import textwrap
import tracemalloc
from pathlib import Path
from types import ModuleType

import pytest

from gateway._native import mqtt

ROOT = Path(__file__).resolve().parent.parent
TARGET = ROOT / "tests" / "fuzz" / "fuzz_mqtt.py"
CORPUS = ROOT / "tests" / "fuzz" / "corpus_mqtt"


def load_target() -> ModuleType:
    spec = importlib.util.spec_from_file_location("fuzz_mqtt", TARGET)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---- the fuzz target ---------------------------------------------------------------------------


@pytest.mark.fuzz
def test_fuzz_target_runs_20000_inputs_without_a_crash(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"  # libFuzzer adds what it finds: keep the committed seeds as is
    shutil.copytree(CORPUS, corpus)
    result = subprocess.run(
        [sys.executable, str(TARGET.relative_to(ROOT)), "-runs=20000",
         f"-artifact_prefix={tmp_path}/", str(corpus)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    # libFuzzer prints its seed ("INFO: Seed: N") first: -seed=N reproduces a failure.
    assert result.returncode == 0, result.stderr[:300] + "\n...\n" + result.stderr[-6000:]
    assert "Done 20000 runs" in result.stderr


def test_every_seed_passes_the_target_checks() -> None:
    target = load_target()
    for seed in sorted(CORPUS.iterdir()):
        target.TestOneInput(seed.read_bytes())


# ---- codec bugs found while fuzzing and probing ------------------------------------------------


def publish_v5_with_properties(block: bytes) -> bytes:
    """A QoS 0 PUBLISH to "t" with payload "x" whose property block is `block` (length too)."""
    body = b"\x00\x01t" + block + b"x"
    return bytes([0x30, len(body)]) + body


@pytest.mark.parametrize(
    "block",
    [
        pytest.param(b"\x82\x00\x0b\x05", id="property-length"),
        pytest.param(b"\x03\x8b\x00\x05", id="property-identifier"),
        pytest.param(b"\x03\x0b\x85\x00", id="subscription-identifier"),
    ],
)
def test_non_minimal_variable_byte_integer_in_properties_is_malformed(block: bytes) -> None:
    """MQTT 5.0 1.5.5 [MQTT-1.5.5-1]: a Variable Byte Integer uses the fewest bytes. The codec
    enforces it for the remaining length but not inside property blocks (cur_varint in
    _read_properties): the frames here decode as subscription_identifiers=[5]."""
    assert mqtt.decode(publish_v5_with_properties(b"\x02\x0b\x05"), 5).properties is not None
    with pytest.raises(mqtt.MalformedPacket):
        mqtt.decode(publish_v5_with_properties(block), 5)


def test_feed_error_hands_over_a_large_frame_completed_in_the_same_call() -> None:
    """exc.packets must hold every packet decoded before the error in the same read. Framer.feed()
    completes a large (>= 4096 bytes) partial frame in its own buffer, then decodes the rest of
    the data; when the rest is bad, the large frame's packet is lost (it is in a local list of
    feed(), not in exc.packets)."""
    big = mqtt.Publish("t", b"y" * 5000, 1, packet_id=1).encode(4)
    framer = mqtt.Framer(version=4)
    assert framer.feed(big[:100]) == []
    with pytest.raises(mqtt.MalformedPacket) as caught:
        framer.feed(big[100:] + mqtt.PINGREQ_FRAME + b"\x00\x00")  # packet type 0: malformed
    assert [p.type for p in caught.value.packets] == [mqtt.PUBLISH, mqtt.PINGREQ]


def test_buffer_updated_before_get_buffer_raises_instead_of_crashing() -> None:
    """A Framer made without an arena gets one in get_buffer(); buffer_updated() called first
    dereferences the missing arena (Cython does not check None for a typed attribute) and the
    process dies with SIGSEGV. Run in a child process to keep pytest alive."""
    code = textwrap.dedent(
        """
        from gateway._native import mqtt
        try:
            mqtt.Framer().buffer_updated(0)
        except Exception:
            pass
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
    assert result.returncode == 0, f"child died with {result.returncode}"


def test_a_header_alone_does_not_allocate_the_whole_declared_frame() -> None:
    """Framer._keep() gives a partial frame of >= 4096 bytes a bytearray of its full declared size
    (zero-filled) as soon as its fixed header is in: 5 bytes from a peer cost max_packet_size
    bytes per connection (1 MiB with the gateway's default, 256 MiB with the codec's). DESIGN.md
    wants small idle connections; growing the buffer as the bytes arrive would keep them small."""
    framer = mqtt.Framer(version=4, max_packet_size=1 << 20)
    tracemalloc.start()
    try:
        framer.feed(b"\x30\xf9\xff\x3f")  # the fixed header of a 1 MiB - 7 bytes PUBLISH
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert framer.pending == 4
    assert held < 64 * 1024, f"{held} bytes held for a 4-byte partial frame"
