"""Coverage-guided fuzzing of the destination's receive path with atheris (libFuzzer).

    python tests/fuzz/fuzz_stream.py CORPUS_DIR [libFuzzer flags, e.g. -runs=100000]

Each input is a whole migration stream handed to `destination.receive` from
memory (tests/fuzz/target.py): it must be accepted or refused with a
KvmliteError.  Any other exception, a SIGSEGV from a write into the guard
pages around guest RAM, or an input slower than libFuzzer's -timeout is a
crash, saved as crash-*/timeout-* under -artifact_prefix.

An empty corpus directory is seeded with valid streams from the real encoders.
Most mutations are followed by a repair of END's counts and checksum, so that
mutated state and device maps get past the END check to restore_devices (a
checksum is a wall no byte mutator climbs); the rest keep their broken
checksum to exercise that refusal too.
"""

import sys
from pathlib import Path

import atheris

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

# Only kvmlite is instrumented for coverage: the decoder, state validation,
# devices and the ABI checks are what the fuzzer should explore.
with atheris.instrument_imports(include=["kvmlite"]):
    from tests.fuzz import target

MEMORY = target.GuardedMemory()


def TestOneInput(data: bytes) -> None:
    target.run_one(data, MEMORY)


def CustomMutator(data: bytes, max_size: int, seed: int) -> bytes:
    data = atheris.Mutate(data, max_size)
    if seed % 4:
        data = target.fix_checksum(data)[:max_size]
    return data


def seed_corpus(argv: list[str]) -> None:
    """Write the seed streams into the first corpus directory if it is empty."""
    dirs = [a for a in argv[1:] if not a.startswith("-")]
    if not dirs:
        return
    corpus = Path(dirs[0])
    if corpus.is_dir() and not any(corpus.iterdir()):
        for name, data in target.seed_streams().items():
            (corpus / f"seed-{name}").write_bytes(data)


def main() -> None:
    seed_corpus(sys.argv)
    atheris.Setup(sys.argv, TestOneInput, custom_mutator=CustomMutator)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
