"""Writes tests/fixtures/hostile/: checkpoints a hostile or broken download could hand kiln.

Standard library only. Each file must give a clear error naming it, without a panic, a memory
blow-up or anything executed (cli/tests/cli.rs reads them):

- absurd_header.safetensors: a header length of 2^62 bytes.
- offsets_beyond.safetensors: a tensor of 4 TB whose data offsets run far past the file's end.
- truncated.pt: the first bytes of a zip archive, then nothing.
- malicious_pickle.pt: a PyTorch zip checkpoint whose data.pkl, unpickled naively, would run
  `os.system("touch <marker>")` (the marker path is under /tmp; the test checks it never appears).
"""
import io
import pathlib
import struct
import zipfile

OUT = pathlib.Path(__file__).resolve().parent.parent / "fixtures" / "hostile"
MARKER = "/tmp/kiln-hostile-pickle-ran"


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "absurd_header.safetensors").write_bytes(struct.pack("<Q", 2**62) + b"{}")
    header = b'{"w":{"dtype":"F32","shape":[1000000000,1000],"data_offsets":[0,4000000000000]}}'
    (OUT / "offsets_beyond.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 16)
    (OUT / "truncated.pt").write_bytes(b"PK\x03\x04\x14\x00\x00\x00")
    # GLOBAL os.system, the command as its argument, REDUCE: what pickle.load would call.
    payload = b"cos\nsystem\n(V touch " + MARKER.encode() + b"\ntR."
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("archive/data.pkl", payload)
        archive.writestr("archive/version", "3\n")
    (OUT / "malicious_pickle.pt").write_bytes(buffer.getvalue())


if __name__ == "__main__":
    main()
