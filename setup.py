"""Build step that generates the public API's Python code; everything else is in pyproject.toml.

protos/funchat/v1/funchat.proto -> funchat/v1/{__init__,funchat_pb2,funchat_pb2_grpc}.py and
funchat_pb2.pyi, with the grpcio-tools pinned in [build-system].requires (stubs from a newer
grpcio-tools would not import under protobuf 6). The generated files are git-ignored and never
written at run time, so an installed funchat works from a read-only site-packages.

- wheel / `pip install .`: written into the build directory, so they ship inside the wheel;
- editable install (`pip install -e .`, `make setup`): written into the checkout's funchat/v1/,
  where the editable install imports them from.

This is a sub-command of `build` (setuptools' documented extension point) rather than an override
of `build_py`: setuptools runs a customised build_py of an editable install with its exceptions
turned into a warning, which would hide a protoc failure.
"""

from __future__ import annotations

from pathlib import Path

from setuptools import Command, setup
from setuptools.command.build import build

ROOT = Path(__file__).resolve().parent
PROTO_ROOT = "protos"                      # relative to ROOT, as setuptools wants source paths
PROTO = f"{PROTO_ROOT}/funchat/v1/funchat.proto"
PACKAGE_DIR = Path("funchat") / "v1"        # where the generated modules go, under an output root
GENERATED = ["__init__.py", "funchat_pb2.py", "funchat_pb2.pyi", "funchat_pb2_grpc.py"]
INIT = '"""Generated at build time from protos/funchat/v1/funchat.proto (setup.py): do not edit."""\n'


def generate_protos(out_root: Path) -> list[Path]:
    """Run protoc on the .proto, writing funchat/v1/ under out_root; -> the files written."""
    import grpc_tools  # a build requirement ([build-system].requires)
    from grpc_tools import protoc

    proto = ROOT / PROTO
    if not proto.is_file():
        raise RuntimeError(f"{proto} is missing: the package cannot be built without its API definition")
    well_known = Path(grpc_tools.__file__).parent / "_proto"  # google/protobuf/*.proto
    out_root.mkdir(parents=True, exist_ok=True)
    rc = protoc.main(["grpc_tools.protoc", f"-I{ROOT / PROTO_ROOT}", f"-I{well_known}",
                      f"--python_out={out_root}", f"--pyi_out={out_root}", f"--grpc_python_out={out_root}",
                      str(proto)])
    if rc != 0:
        raise RuntimeError(f"protoc failed on {proto} (exit {rc})")
    (out_root / PACKAGE_DIR / "__init__.py").write_text(INIT)
    return [out_root / PACKAGE_DIR / name for name in GENERATED]


class build_protos(Command):
    """Generate funchat/v1 from protos/ (see the module docstring for where it goes)."""

    description = "generate the public API's Python code from protos/"
    user_options: list = []

    def initialize_options(self) -> None:
        self.build_lib = None
        self.editable_mode = False  # set by setuptools for editable installs
        self._outputs: list[str] = []

    def finalize_options(self) -> None:
        self.set_undefined_options("build_py", ("build_lib", "build_lib"))

    def run(self) -> None:
        out_root = ROOT if self.editable_mode else Path(self.build_lib)
        written = generate_protos(out_root)
        self._outputs = [] if self.editable_mode else [str(p) for p in written]

    def get_source_files(self) -> list[str]:
        return [PROTO]  # so that an sdist carries it (MANIFEST.in says so too)

    def get_outputs(self) -> list[str]:
        return self._outputs

    def get_output_mapping(self) -> dict[str, str]:
        return {}  # generated files have no source file in the package to link to


class build_with_protos(build):
    # After build_py: a stale funchat/v1 left in the checkout by an editable install is copied by
    # build_py, then overwritten here with code generated from the current .proto.
    sub_commands = build.sub_commands + [("build_protos", None)]


setup(cmdclass={"build": build_with_protos, "build_protos": build_protos})
