#!/usr/bin/env bash
# Build the fuzz seed corpora from the real kernel captures in tests/fixtures/*.bin.
#
#   fuzz/corpus/parse_event/              one file per captured datagram, byte for byte
#   fuzz/corpus/parse_event_with_header/  the same messages in that target's input layout:
#                                         1 selector byte (type / flags / family of the
#                                         original header), then the attributes, i.e.
#                                         the message with its 20-byte nlmsghdr+nfgenmsg
#                                         stripped
#
# Usage: fuzz/seed-corpus.sh [FIXTURE.bin ...]     (default: tests/fixtures/*.bin)
#
# Seed files are named seed-<fixture>-<index>; a re-run replaces the seed-* files and leaves
# alone whatever the fuzzer added to the corpus directories. Nothing here is committed
# (fuzz/.gitignore lists corpus/).
set -euo pipefail

fuzz_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo_dir="$(dirname "$fuzz_dir")"

if [ "$#" -eq 0 ]; then
    shopt -s nullglob
    set -- "$repo_dir"/tests/fixtures/*.bin
    shopt -u nullglob
fi
if [ "$#" -eq 0 ]; then
    echo "seed-corpus.sh: no fixtures found in $repo_dir/tests/fixtures" >&2
    exit 1
fi

python3 - "$fuzz_dir/corpus" "$@" <<'PY'
import os, struct, sys
from pathlib import Path

corpus = Path(sys.argv[1])
fixtures = [Path(p) for p in sys.argv[2:]]

raw_dir = corpus / "parse_event"
hdr_dir = corpus / "parse_event_with_header"
for d in (raw_dir, hdr_dir):
    d.mkdir(parents=True, exist_ok=True)
    for old in d.glob("seed-*"):
        old.unlink()

HDR_LEN = 20  # struct nlmsghdr (16) + struct nfgenmsg (4)
CT_DELETE = 0x0102
NLM_F_CREATE_EXCL = 0x0600
AF_INET6 = 10

def selector(msg: bytes) -> int:
    """parse_event_with_header's first byte for the header `msg` starts with."""
    _len, nl_type, nl_flags, _seq, _pid = struct.unpack_from("=IHHII", msg, 0)
    family = msg[16]
    sel = 0
    if nl_type == CT_DELETE:
        sel |= 0b001
    if nl_flags & NLM_F_CREATE_EXCL != NLM_F_CREATE_EXCL:
        sel |= 0b010
    if family == AF_INET6:
        sel |= 0b100
    return sel

total_raw = total_hdr = 0
for fx in fixtures:
    buf = fx.read_bytes()
    off = idx = 0
    while off < len(buf):
        if off + 4 > len(buf):
            sys.exit(f"{fx}: truncated record length at offset {off}")
        (n,) = struct.unpack_from("<I", buf, off)
        off += 4
        if off + n > len(buf):
            sys.exit(f"{fx}: record {idx} claims {n} bytes, only {len(buf) - off} left")
        dgram = buf[off:off + n]
        off += n
        name = f"seed-{fx.stem}-{idx:04d}"
        (raw_dir / name).write_bytes(dgram)
        total_raw += 1
        if len(dgram) >= HDR_LEN:
            # Each fixture datagram holds exactly one message (see tests/fixtures/README.md);
            # keep only the first message's attributes if that ever changes.
            (nlmsg_len,) = struct.unpack_from("=I", dgram, 0)
            end = nlmsg_len if HDR_LEN <= nlmsg_len <= len(dgram) else len(dgram)
            (hdr_dir / name).write_bytes(bytes([selector(dgram)]) + dgram[HDR_LEN:end])
            total_hdr += 1
        idx += 1
    print(f"{fx.name}: {idx} records")

print(f"wrote {total_raw} seeds to {raw_dir}")
print(f"wrote {total_hdr} seeds to {hdr_dir}")
PY
