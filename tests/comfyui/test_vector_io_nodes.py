"""SavePathologyVector and LoadPathologyVector in real ComfyUI: the vector folder, its listing and
extra_model_paths, and refused files and names (corrupt, unsafe, missing, escaping).

Every graph runs through ComfyUI's PromptExecutor on a random-weight PixArt (4 blocks of width 48,
34x34 latents). Equality claims are bit-exact (``torch.equal``). Reference runs use a fresh
executor, so no result comes from ComfyUI's cache.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from comfy_boot import Graph
from pixart_graphs import error_of, load, pair_graph, vector_of


def test_corrupt_and_unsafe_vector_files_are_refused_before_running(comfy_env):
    (comfy_env.vector_dir / "corrupt.safetensors").write_bytes(b"\x0a\x00\x00\x00\x00\x00\x00\x00{not json}")
    torch.save({"directions": torch.zeros(2)}, comfy_env.vector_dir / "pickled.safetensors")
    for name, words in (("corrupt.safetensors", "not valid JSON"), ("pickled.safetensors", "pickle")):
        g, _ = pair_graph(name)
        result = error_of(comfy_env, g)
        assert result.error_type == "validation" and words in result.error and name in result.error


def test_vector_folder_lists_safetensors_only_and_honours_extra_model_paths(comfy_env, tmp_path):
    import folder_paths
    import utils.extra_config

    extra = tmp_path / "shared_vectors"
    extra.mkdir()
    comfy_env.core.save_vector(
        vector_of(comfy_env, comfy_env.write_vector("extra_src", seed=20)), extra / "from_extra.safetensors"
    )
    (extra / "notes.txt").write_text("not a vector")
    (tmp_path / "extra.yaml").write_text(f"lab:\n    base_path: {tmp_path}\n    medsteer: shared_vectors\n")
    paths_before = folder_paths.get_folder_paths("medsteer")
    utils.extra_config.load_extra_path_config(str(tmp_path / "extra.yaml"))
    try:
        listed = folder_paths.get_filename_list("medsteer")
        assert "from_extra.safetensors" in listed and "notes.txt" not in listed
        g, nodes = pair_graph("from_extra.safetensors")
        assert comfy_env.run(g).success
        # registered before the pack loads (extra_model_paths.yaml is read first): kept, filtered
        vector_io = sys.modules[comfy_env.pack.__name__ + ".nodes.vector_io"]
        saved = folder_paths.folder_names_and_paths.pop("medsteer")
        folder_paths.add_model_folder_path("medsteer", str(extra))
        vector_io.register_vector_folder()
        paths, extensions = folder_paths.folder_names_and_paths["medsteer"]
        assert paths == [paths_before[0], str(extra)] and extensions == {".safetensors"}
        folder_paths.folder_names_and_paths["medsteer"] = saved
    finally:
        paths = folder_paths.folder_names_and_paths["medsteer"][0]
        if str(extra) in paths:
            paths.remove(str(extra))


def test_vector_folder_exists_from_the_start(comfy_env, tmp_path, monkeypatch):
    import folder_paths

    # the booted ComfyUI's models/medsteer (its base directory is a fresh temporary folder)
    assert Path(folder_paths.get_folder_paths("medsteer")[0]) == Path(folder_paths.models_dir) / "medsteer"
    assert (Path(folder_paths.models_dir) / "medsteer").is_dir()
    # what the pack does when it loads, on a ComfyUI whose models/ has no medsteer folder yet, with an
    # extra_model_paths.yaml folder registered first: models/medsteer is created, the extra one is not
    vector_io = sys.modules[comfy_env.pack.__name__ + ".nodes.vector_io"]
    models = tmp_path / "models"
    models.mkdir()
    monkeypatch.setattr(folder_paths, "models_dir", str(models))
    saved = folder_paths.folder_names_and_paths.pop("medsteer")
    try:
        folder_paths.add_model_folder_path("medsteer", str(tmp_path / "elsewhere"))
        vector_io.register_vector_folder()
        assert folder_paths.get_folder_paths("medsteer")[0] == str(models / "medsteer")
        assert (models / "medsteer").is_dir() and not (tmp_path / "elsewhere").exists()
    finally:
        folder_paths.folder_names_and_paths["medsteer"] = saved


def test_missing_or_escaping_vector_names_are_refused_at_queue_time(comfy_env):
    name = comfy_env.write_vector("queue_time_ok", seed=24)
    for bad, words in (
        ("no_such_vector.safetensors", "no pathology vector 'no_such_vector.safetensors' in models/medsteer/"),
        ("../" + name, "without '..'"),
        (str(comfy_env.vector_dir / name), "without '..'"),
    ):
        g, _ = pair_graph(bad)
        (loader,) = [i for i, n in g.prompt.items() if n["class_type"] == "LoadPathologyVector"]
        _, _, outputs, node_errors = comfy_env.validate(g)  # the unsteered sampler's output stays valid
        assert list(node_errors) == [loader] and len(outputs) == 1
        (message,) = [e["details"] for e in node_errors[loader]["errors"]]
        assert words in message and repr(bad) in message and name not in message.replace(bad, "")
    g, _ = pair_graph(name)
    valid, _, outputs, node_errors = comfy_env.validate(g)
    assert valid and node_errors == {} and len(outputs) == 2


def test_save_refuses_names_outside_the_folder(comfy_env):
    name = comfy_env.write_vector("save_src", seed=21)
    g = Graph()
    g.add("SavePathologyVector", pathology_vector=load(g, name), filename_prefix="../escape")
    result = error_of(comfy_env, g)
    assert "inside models/medsteer" in result.error
    assert not (comfy_env.vector_dir.parent / "escape_00001_.safetensors").exists()
