"""SavePathologyVector / LoadPathologyVector: vector files under ``models/medsteer/``.

Files are safetensors only (never pickle), validated on load by ``medsteer_core.load_vector``.
The ``medsteer`` model folder is registered with ``folder_paths`` so ``extra_model_paths.yaml``
entries named ``medsteer`` are listed too, and ``models/medsteer/`` is created when the pack loads
(so a new user finds the folder the nodes talk about).
"""

from __future__ import annotations

import logging
import os

import folder_paths
from comfy_api.latest import io

from ..medsteer_core import load_vector, save_vector
from ..medsteer_core.comfy_widgets import check_save_name
from ..medsteer_core.vector_file import check_vector_header
from .common import CATEGORY, PathologyVectorSocket, model_name_problem

FOLDER = "medsteer"
EXTENSIONS = {".safetensors"}


def register_vector_folder() -> None:
    """Register ``models/medsteer`` (first, where vectors are saved) with a .safetensors filter, and create it.

    Keeps folders that ``extra_model_paths.yaml`` registered earlier under the same name. Without
    the filter, ``add_model_folder_path`` would list every file in the folder. A folder that cannot
    be created (read-only install) is logged, not fatal: loading vectors from other folders still works.
    """
    default = os.path.join(folder_paths.models_dir, FOLDER)
    folder_paths.add_model_folder_path(FOLDER, default, is_default=True)
    paths, _ = folder_paths.folder_names_and_paths[FOLDER]
    folder_paths.folder_names_and_paths[FOLDER] = (paths, set(EXTENSIONS))
    try:
        os.makedirs(paths[0], exist_ok=True)
    except OSError as error:
        logging.warning("MedSteer: cannot create the vector folder %s (%s)", paths[0], error.strerror or error)


def vector_path(vector_name: str) -> str:
    """The full path of a listed vector file (looked up only inside the medsteer folders), or a clear error."""
    problem = model_name_problem(vector_name, "models/medsteer/")
    if problem is not None:
        raise FileNotFoundError(f"pathology vector: {problem}")
    path = folder_paths.get_full_path(FOLDER, vector_name)
    if path is None:
        raise FileNotFoundError(
            f"no pathology vector {vector_name!r} in models/medsteer/ (searched {folder_paths.get_folder_paths(FOLDER)}): "
            "save one with SavePathologyVector or copy a .safetensors vector there, then refresh the page (press R)"
        )
    return path


register_vector_folder()


class SavePathologyVector(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SavePathologyVector",
            display_name="MedSteer Save Pathology Vector",
            category=CATEGORY,
            description="Saves a pathology vector as .safetensors (with its metadata) under models/medsteer/.",
            inputs=[
                PathologyVectorSocket.Input("pathology_vector", tooltip="The vector to save."),
                io.String.Input(
                    "filename_prefix",
                    default="pathology_vector",
                    tooltip="File name inside models/medsteer/ (subfolders allowed, e.g. 'kvasir/dye'); "
                    "a counter and .safetensors are appended, so nothing is overwritten.",
                ),
            ],
            outputs=[],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, pathology_vector, filename_prefix: str) -> io.NodeOutput:
        prefix = check_save_name(filename_prefix)
        root = os.path.abspath(folder_paths.get_folder_paths(FOLDER)[0])
        folder, name, counter, subfolder, _ = folder_paths.get_save_image_path(prefix, root)
        path = save_vector(pathology_vector, os.path.join(folder, f"{name}_{counter:05}_.safetensors"))
        saved = os.path.relpath(path, root).replace(os.sep, "/")
        return io.NodeOutput(ui={"text": [f"saved models/medsteer/{saved}"]})


class LoadPathologyVector(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoadPathologyVector",
            display_name="MedSteer Load Pathology Vector",
            category=CATEGORY,
            description="Loads and validates a pathology vector (.safetensors) from models/medsteer/.",
            inputs=[
                io.Combo.Input(
                    "vector_name",
                    options=folder_paths.get_filename_list(FOLDER),
                    tooltip="A vector file in models/medsteer/ (or a folder named medsteer in "
                    "extra_model_paths.yaml). Only .safetensors files are listed.",
                ),
            ],
            outputs=[
                PathologyVectorSocket.Output(
                    display_name="pathology_vector",
                    tooltip="The vector, checked for format, shapes and finite unit directions.",
                ),
            ],
        )

    @classmethod
    def validate_inputs(cls, vector_name: str | None = None):
        # A missing, foreign or corrupt-headed file is reported before the graph runs, reading the
        # header only (this runs on the server's event loop; execute reads and validates the whole
        # file, once). Naming vector_name here turns off ComfyUI's "value not in list" check, so the
        # existence check is ours.
        if vector_name is None:
            return True
        try:
            check_vector_header(vector_path(vector_name))
        except (FileNotFoundError, ValueError) as error:
            return str(error)
        return True

    @classmethod
    def fingerprint_inputs(cls, vector_name: str):
        # Reload when the file changes on disk under the same name.
        path = folder_paths.get_full_path(FOLDER, vector_name)
        if path is None:
            return vector_name
        stat = os.stat(path)
        return f"{path}:{stat.st_mtime_ns}:{stat.st_size}"

    @classmethod
    def execute(cls, vector_name: str) -> io.NodeOutput:
        return io.NodeOutput(load_vector(vector_path(vector_name)))
