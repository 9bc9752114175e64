"""Every example workflow loads in ComfyUI: no missing node, no broken link, every value accepted.

ComfyUI validates only API-format prompts, so each UI-format file (what the frontend saves and the
template browser opens) is converted here with our own converter against the registered node
schemas, then checked with ComfyUI's ``execution.validate_prompt``. The model files a user would
download are stood in for by empty placeholder files of the same names (validation reads names,
never contents).
"""

from __future__ import annotations

import asyncio
import copy
import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
WORKFLOWS = sorted((REPO / "example_workflows").glob("*.json"))
FRONTEND_ONLY = {"Note", "MarkdownNote", "PrimitiveNode", "Reroute"}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
MUTED, BYPASSED = 2, 4
# inputs that name a file or folder a user puts under models/<folder>
FILE_INPUTS = {
    ("MedSteerLoadPixArtAlpha", "ckpt_name"): "checkpoints",
    ("CheckpointLoaderSimple", "ckpt_name"): "checkpoints",
    ("MedSteerLoadPeftLora", "lora_name"): "loras",
    ("LoadPathologyVector", "vector_name"): "medsteer",
    ("CLIPLoader", "clip_name"): "text_encoders",
    ("VAELoader", "vae_name"): "vae",
}


class WorkflowError(ValueError):
    """A UI-format workflow that ComfyUI could not load as it is."""


def widget_inputs(class_def) -> list[tuple[str, dict]]:
    """The inputs the frontend shows as widgets, in the order of ``widgets_values``."""
    widgets = []
    for section in ("required", "optional"):
        for name, spec in (class_def.INPUT_TYPES().get(section) or {}).items():
            kind = spec[0]
            options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            is_widget = isinstance(kind, (list, tuple)) or str(kind) in WIDGET_TYPES
            if is_widget and not options.get("forceInput"):
                widgets.append((name, options))
    return widgets


def input_type(class_def, name: str) -> str | None:
    for section in ("required", "optional"):
        spec = (class_def.INPUT_TYPES().get(section) or {}).get(name)
        if spec is not None:
            return "COMBO" if isinstance(spec[0], (list, tuple)) else str(spec[0])
    return None


def ui_to_api(workflow: dict, classes: dict) -> dict:
    """Convert a UI-format workflow into an API prompt the way the frontend queues it.

    Notes are dropped, PrimitiveNode values are written into the widgets they drive, Reroutes and
    bypassed nodes pass their input through, muted nodes are left out. Raises ``WorkflowError``
    naming the node, input or link for a missing node type, a dangling or inconsistent link, a link
    whose type differs from the schema, or widget values that do not fit the schema.
    """
    nodes = {n["id"]: n for n in workflow["nodes"]}
    links = {}
    for link in workflow["links"]:
        link_id, origin, origin_slot, target, target_slot, link_type = (
            (
                link["id"],
                link["origin_id"],
                link["origin_slot"],
                link["target_id"],
                link["target_slot"],
                link.get("type"),
            )
            if isinstance(link, dict)
            else link[:6]
        )
        links[link_id] = (origin, origin_slot, target, target_slot, link_type)
        if origin not in nodes or target not in nodes:
            raise WorkflowError(f"link {link_id} joins missing node {origin if origin not in nodes else target}")
        outputs = nodes[origin].get("outputs") or []
        if origin_slot >= len(outputs) or link_id not in (outputs[origin_slot].get("links") or []):
            raise WorkflowError(f"link {link_id}: node {origin} output {origin_slot} does not list it")
        inputs = nodes[target].get("inputs") or []
        if target_slot >= len(inputs) or inputs[target_slot].get("link") != link_id:
            raise WorkflowError(f"link {link_id}: node {target} input {target_slot} does not hold it")
        if outputs[origin_slot].get("type") != link_type:
            raise WorkflowError(
                f"link {link_id} has type {link_type} but node {origin} output {origin_slot} is {outputs[origin_slot].get('type')}"
            )
    for node in nodes.values():
        for inp in node.get("inputs") or []:
            if inp.get("link") is not None and inp["link"] not in links:
                raise WorkflowError(
                    f"node {node['id']} ({node['type']}) input {inp['name']!r} uses unknown link {inp['link']}"
                )
        for out in node.get("outputs") or []:
            for link_id in out.get("links") or []:
                if link_id not in links:
                    raise WorkflowError(
                        f"node {node['id']} ({node['type']}) output {out['name']!r} lists unknown link {link_id}"
                    )

    def source(link_id: int, seen=()):
        """The API value feeding a link: ``[node id, slot]`` or a primitive's literal."""
        origin, slot, _, _, link_type = links[link_id]
        node = nodes[origin]
        if origin in seen:
            raise WorkflowError(f"link {link_id} loops through node {origin}")
        if node["type"] == "PrimitiveNode":
            return node["widgets_values"][0]
        if node["type"] == "Reroute" or node.get("mode", 0) == BYPASSED:
            for inp in node.get("inputs") or []:
                if inp.get("link") is not None and (node["type"] == "Reroute" or inp["type"] == link_type):
                    return source(inp["link"], (*seen, origin))
            raise WorkflowError(f"node {origin} ({node['type']}) passes nothing through to link {link_id}")
        if node.get("mode", 0) == MUTED:
            raise WorkflowError(f"link {link_id} comes from muted node {origin}")
        return [str(origin), slot]

    prompt = {}
    for node_id, node in nodes.items():
        kind = node["type"]
        if kind in FRONTEND_ONLY or node.get("mode", 0) in (MUTED, BYPASSED):
            continue
        class_def = classes.get(kind)
        if class_def is None:
            raise WorkflowError(f"node {node_id}: node type {kind!r} is not registered (a missing custom node)")
        inputs = {}
        for inp in node.get("inputs") or []:
            if inp.get("link") is None:
                continue
            want = input_type(class_def, inp["name"])
            if want is None:
                raise WorkflowError(f"node {node_id} ({kind}) has no input {inp['name']!r}")
            got = links[inp["link"]][4]
            if want not in ("*", got) and not (want == "COMBO" and got in ("COMBO", "STRING")):
                raise WorkflowError(
                    f"node {node_id} ({kind}) input {inp['name']!r} takes {want}, its link carries {got}"
                )
            inputs[inp["name"]] = source(inp["link"])
        values = node.get("widgets_values") or []
        widgets = widget_inputs(class_def)
        expected = sum(2 if options.get("control_after_generate") else 1 for _, options in widgets)
        if isinstance(values, list) and len(values) != expected:
            raise WorkflowError(f"node {node_id} ({kind}) has {len(values)} widget values, its schema takes {expected}")
        index = 0
        for name, options in widgets:
            if isinstance(values, dict):
                if name in values and name not in inputs:
                    inputs[name] = values[name]
                continue
            inputs.setdefault(name, values[index])
            index += 2 if options.get("control_after_generate") else 1  # + "fixed / increment / randomize"
        for name in class_def.INPUT_TYPES().get("required") or {}:
            if name not in inputs:
                raise WorkflowError(f"node {node_id} ({kind}): required input {name!r} is neither linked nor set")
        for out_slot, out in enumerate(node.get("outputs") or []):
            declared = list(class_def.RETURN_TYPES)
            if out_slot >= len(declared) or str(declared[out_slot]) != out["type"]:
                raise WorkflowError(
                    f"node {node_id} ({kind}) output {out_slot} is {out['type']} in the file but not in the schema"
                )
        prompt[str(node_id)] = {"class_type": kind, "inputs": inputs, "_meta": {"title": node.get("title", kind)}}
    return prompt


@pytest.fixture(scope="module")
def classes(comfy_env):
    import nodes

    if "ImageStitch" not in nodes.NODE_CLASS_MAPPINGS:  # ComfyUI's built-in extras, loaded at every real startup
        asyncio.run(nodes.init_builtin_extra_nodes())
    return nodes.NODE_CLASS_MAPPINGS


@pytest.fixture(scope="module")
def placeholders(comfy_env, classes, tmp_path_factory):
    """Empty stand-ins for every model file the workflows name, registered with folder_paths."""
    import folder_paths

    root = tmp_path_factory.mktemp("workflow_models")
    for path in WORKFLOWS:
        prompt = ui_to_api(json.loads(path.read_text()), classes)
        for node in prompt.values():
            for name, value in node["inputs"].items():
                folder = FILE_INPUTS.get((node["class_type"], name))
                if folder is None or not isinstance(value, str):
                    continue
                if folder == "medsteer":  # LoadPathologyVector reads the file while validating: a real one
                    if value not in folder_paths.get_filename_list("medsteer"):  # never shadow a shipped vector
                        comfy_env.write_vector(value)
                    continue
                target = root / folder / value
                if value.endswith("/"):
                    for sub in ("transformer_lora", "text_encoder_lora") if folder == "loras" else ():
                        (target / sub).mkdir(parents=True, exist_ok=True)
                    target.mkdir(parents=True, exist_ok=True)
                else:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.touch()
    for folder in set(FILE_INPUTS.values()) - {"medsteer"}:
        (root / folder).mkdir(exist_ok=True)
        folder_paths.add_model_folder_path(folder, str(root / folder))
    return root


def test_there_are_eight_example_workflows_with_thumbnails():
    from PIL import Image

    assert [p.stem for p in WORKFLOWS] == [
        "medsteer_batch_pairs",
        "medsteer_build_vector",
        "medsteer_compositional_edit",
        "medsteer_counterfactual_pair",
        "medsteer_counterfactual_pair_sd",
        "medsteer_dye_removal",
        "medsteer_quickstart_mini",
        "medsteer_quickstart_mini_unet",
    ]
    for path in WORKFLOWS:
        with Image.open(path.with_suffix(".jpg")) as thumbnail:
            assert thumbnail.width >= 800 and thumbnail.height >= 300


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_example_workflow_converts_and_validates(comfy_env, classes, placeholders, path):
    prompt = ui_to_api(json.loads(path.read_text()), classes)
    valid, error, outputs, node_errors = comfy_env.validate(prompt)
    details = {nid: [e.get("details") or e.get("message") for e in v["errors"]] for nid, v in node_errors.items()}
    assert valid, f"{path.name}: {error} {details}"
    output_types = {prompt[n]["class_type"] for n in outputs}
    assert output_types & {"PreviewImage", "SaveImage", "SavePathologyVector"}


def test_converter_rejects_broken_workflows(classes):
    workflow = json.loads((REPO / "example_workflows" / "medsteer_counterfactual_pair.json").read_text())
    ui_to_api(workflow, classes)

    broken = copy.deepcopy(workflow)
    broken["links"].pop(3)
    with pytest.raises(WorkflowError, match="unknown link"):
        ui_to_api(broken, classes)

    broken = copy.deepcopy(workflow)
    steer = next(n for n in broken["nodes"] if n["type"] == "ApplySSPSSteer")
    steer["type"] = "ApplySSPSSteerTypo"
    with pytest.raises(WorkflowError, match="'ApplySSPSSteerTypo' is not registered"):
        ui_to_api(broken, classes)

    broken = copy.deepcopy(workflow)
    steer = next(n for n in broken["nodes"] if n["type"] == "ApplySSPSSteer")
    steer["widgets_values"].pop()
    with pytest.raises(WorkflowError, match="8 widget values, its schema takes 9"):
        ui_to_api(broken, classes)

    broken = copy.deepcopy(workflow)
    link = next(link for link in broken["links"] if link[5] == "PATHOLOGY_VECTOR")
    link[5] = "MODEL"
    with pytest.raises(WorkflowError, match="has type MODEL"):
        ui_to_api(broken, classes)


CONTROL_VALUES = ("fixed", "increment", "decrement", "randomize")


def live_widgets(class_def) -> list[tuple[str, str, dict]]:
    """``(name, kind, options)`` for each value of a node's ``widgets_values``, in the frontend's order.

    Frontend 1.27.10 makes a widget of every required, then optional, input whose type is a widget
    type (forceInput ones stay sockets), and follows an INT widget with ``control_after_generate``
    (or named ``seed`` / ``noise_seed``, its legacy rule) or a COMBO with it by a control widget whose
    value the file also stores (widgets.ts, useIntWidget / useComboWidget). ``options["options"]``
    is a COMBO's list, also for V1 schemas that give the list as the type.
    """
    widgets = []
    for name, options in widget_inputs(class_def):
        kind = input_type(class_def, name)
        if kind == "COMBO" and "options" not in options:
            spec = (class_def.INPUT_TYPES().get("required") or {}).get(name) or class_def.INPUT_TYPES()["optional"][
                name
            ]
            options = {**options, "options": list(spec[0])}
        widgets.append((name, kind, options))
        control = options.get("control_after_generate", kind == "INT" and name in ("seed", "noise_seed"))
        if control and kind in ("INT", "COMBO"):
            widgets.append(("control_after_generate", "CONTROL", {}))
    return widgets


def value_problem(kind: str, options: dict, value, file_folder: str | None = None) -> str | None:
    """Why ``value`` does not fit a widget, or None. A COMBO listing files accepts a name the user
    downloads or builds (not on this machine) when the folder takes files of its extension."""
    import folder_paths

    if kind == "CONTROL":
        return None if value in CONTROL_VALUES else f"is {value!r}, not one of {CONTROL_VALUES}"
    if kind == "COMBO":
        if value in options["options"]:
            return None
        if file_folder is not None and isinstance(value, str):
            extensions = folder_paths.folder_names_and_paths[file_folder][1]
            if value.endswith("/") or any(value.endswith(e) for e in extensions) or not extensions:
                return None
            return f"is {value!r}: not a {sorted(extensions)} file name for models/{file_folder}"
        return f"is {value!r}, not one of {options['options'][:8]}"
    types = {"INT": int, "FLOAT": (int, float), "BOOLEAN": bool, "STRING": str}
    if not isinstance(value, types.get(kind, object)) or (kind != "BOOLEAN" and isinstance(value, bool)):
        return f"is {value!r}, not a {kind}"
    if kind in ("INT", "FLOAT") and not options.get("min", value) <= value <= options.get("max", value):
        return f"is {value}, outside [{options.get('min')}, {options.get('max')}]"
    return None


def live_schema_problems(workflow: dict, classes: dict) -> list[str]:
    """What in a UI-format workflow the live node schemas refuse: an unknown node type, a
    ``widgets_values`` count other than the schema's, a value of the wrong type, outside its range or
    not among a combo's options; a PrimitiveNode's value that does not fit the widgets it drives."""
    nodes = {n["id"]: n for n in workflow["nodes"]}
    problems = []
    for node in workflow["nodes"]:
        kind, label = node["type"], f"node {node['id']} ({node['type']})"
        if kind in FRONTEND_ONLY:
            continue
        if kind not in classes:
            problems.append(f"{label}: {kind!r} is not in NODE_CLASS_MAPPINGS (a missing custom node)")
            continue
        widgets = live_widgets(classes[kind])
        values = node.get("widgets_values") or []
        if len(values) != len(widgets):
            names = [name for name, _, _ in widgets]
            problems.append(f"{label} has {len(values)} widget values, its schema takes {len(widgets)}: {names}")
            continue
        for (name, widget_kind, options), value in zip(widgets, values, strict=True):
            problem = value_problem(widget_kind, options, value, FILE_INPUTS.get((kind, name)))
            if problem:
                problems.append(f"{label} {name} {problem}")
    links = {link[0]: link for link in workflow["links"]}
    for node in workflow["nodes"]:
        if node["type"] != "PrimitiveNode":
            continue
        for link_id in node["outputs"][0]["links"] or []:
            target = nodes[links[link_id][3]]
            name = target["inputs"][links[link_id][4]]["name"]
            if target["type"] not in classes:
                continue
            (widget,) = [w for w in live_widgets(classes[target["type"]]) if w[0] == name]
            problem = value_problem(widget[1], widget[2], node["widgets_values"][0])
            if problem:
                problems.append(
                    f"node {node['id']} (PrimitiveNode) drives {target['type']} {name}, its value {problem}"
                )
    return problems


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_every_node_and_widget_value_fits_the_live_schemas(classes, path):
    problems = live_schema_problems(json.loads(path.read_text()), classes)
    assert not problems, f"{path.name}: " + "; ".join(problems)


def test_live_schema_check_catches_wrong_values(classes):
    workflow = json.loads((REPO / "example_workflows" / "medsteer_quickstart_mini.json").read_text())
    assert live_schema_problems(workflow, classes) == []

    def broken(node_type: str, index: int, value) -> list[str]:
        copied = copy.deepcopy(workflow)
        next(n for n in copied["nodes"] if n["type"] == node_type)["widgets_values"][index] = value
        return live_schema_problems(copied, classes)

    assert "not one of" in broken("KSampler", 4, "ddim_typo")[0]  # sampler_name
    assert "outside [1, 10000]" in broken("KSampler", 2, 0)[0]  # steps
    assert "not one of ('fixed'" in broken("KSampler", 1, "sometimes")[0]  # seed's control_after_generate
    assert "file name for models/medsteer" in broken("LoadPathologyVector", 0, "dye_removal.pt")[0]
    assert "drives KSampler seed" in broken("PrimitiveNode", 0, -1)[0]
    assert "not a BOOLEAN" in broken("ApplySSPSSteer", 6, "no")[0]  # preserve_norm
    copied = copy.deepcopy(workflow)
    next(n for n in copied["nodes"] if n["type"] == "GateHeatmap")["type"] = "GateHeatmapTypo"
    assert "not in NODE_CLASS_MAPPINGS" in live_schema_problems(copied, classes)[0]


def test_thumbnail_widget_names_are_the_live_schemas(classes):
    """scripts/render_thumbnails.py labels each widget value with a name of its own table (the files
    name none): the names, in order, of every node type the workflows use."""
    spec = importlib.util.spec_from_file_location("render_thumbnails", REPO / "scripts" / "render_thumbnails.py")
    renderer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(renderer)
    used = {n["type"] for path in WORKFLOWS for n in json.loads(path.read_text())["nodes"]}
    for kind in sorted(used - FRONTEND_ONLY):
        live = " ".join(name for name, _, _ in live_widgets(classes[kind]))
        assert renderer.WIDGET_NAMES.get(kind, "") == live, f"render_thumbnails.WIDGET_NAMES[{kind!r}] != {live!r}"
    assert renderer.WIDGET_NAMES["PrimitiveNode"] == "value control_after_generate"


@pytest.mark.parametrize(
    "name",
    [
        "medsteer_counterfactual_pair",
        "medsteer_counterfactual_pair_sd",
        "medsteer_dye_removal",
        "medsteer_batch_pairs",
        "medsteer_quickstart_mini",
        "medsteer_quickstart_mini_unet",
    ],
)
def test_pair_workflows_share_one_seed_and_differ_only_in_the_model(classes, name):
    prompt = ui_to_api(json.loads((REPO / "example_workflows" / f"{name}.json").read_text()), classes)
    samplers = [n["inputs"] for n in prompt.values() if n["class_type"] == "KSampler"]
    assert len(samplers) == 2
    steered, unsteered = sorted(samplers, key=lambda s: prompt[s["model"][0]]["class_type"] != "ApplySSPSSteer")
    assert prompt[steered["model"][0]]["class_type"] == "ApplySSPSSteer"
    assert prompt[steered["model"][0]]["inputs"]["model"] == unsteered["model"]
    assert {k: v for k, v in steered.items() if k != "model"} == {k: v for k, v in unsteered.items() if k != "model"}
    workflow = json.loads((REPO / "example_workflows" / f"{name}.json").read_text())
    primitives = [n for n in workflow["nodes"] if n["type"] == "PrimitiveNode"]
    assert len(primitives) == 1 and len(primitives[0]["outputs"][0]["links"]) == 2  # one seed node feeds both


def test_workflows_use_the_paper_settings(classes):
    """The real-PixArt templates use the paper's settings (the minis' and the SD template: their own,
    tested below and in test_mini_unet.py)."""
    for path in WORKFLOWS:
        if path.stem in (
            "medsteer_quickstart_mini",
            "medsteer_quickstart_mini_unet",
            "medsteer_counterfactual_pair_sd",
        ):
            continue
        prompt = ui_to_api(json.loads(path.read_text()), classes)
        for node in prompt.values():
            inputs = node["inputs"]
            if node["class_type"] == "ApplySSPSSteer":
                assert (inputs["strength"], inputs["layer_start"], inputs["layer_end"]) == (2.5, 8, 16), path.name
                assert (inputs["preserve_norm"], inputs["rows"]) == (False, "cond and uncond")
            if node["class_type"] == "BuildPathologyVector":
                assert (inputs["num_seeds"], inputs["steps"]) == (50, 20)
            if node["class_type"] in ("KSampler", "BuildPathologyVector"):
                assert (inputs["steps"], inputs["cfg"]) == (20, 4.5)
    pair = ui_to_api(
        json.loads((REPO / "example_workflows" / "medsteer_counterfactual_pair.json").read_text()), classes
    )
    heatmaps = [n["inputs"] for n in pair.values() if n["class_type"] == "GateHeatmap"]
    assert heatmaps and heatmaps[0]["preset"].startswith("paper Fig. 3")


def check_steers_as_calibrated(comfy_env, prompt: dict) -> dict[str, list[dict]]:
    """A quickstart prompt steers with what its LoadPathologyVector's vector records as calibrated
    and samples as that vector was calibrated (its steps and CFG, ddim on the trailing 'simple'
    schedule). The setting is read through the library (``PathologyVector.provenance``). Returns
    every node's inputs by class type, for the caller's own checks."""
    by_type = {}
    for node in prompt.values():
        by_type.setdefault(node["class_type"], []).append(node["inputs"])
    (vector_input,) = by_type["LoadPathologyVector"]
    vector = comfy_env.core.load_vector(comfy_env.pack.nodes.vector_io.vector_path(vector_input["vector_name"]))
    provenance = vector.provenance
    calibrated = provenance.calibrated_setting()
    assert set(calibrated) == {"layer_start", "layer_end", "strength"}, (
        f"{vector_input['vector_name']} records no full calibrated setting: {calibrated}"
    )
    (steer,) = by_type["ApplySSPSSteer"]
    assert (steer["layer_start"], steer["layer_end"], steer["strength"]) == (
        calibrated["layer_start"],
        calibrated["layer_end"],
        calibrated["strength"],
    )
    for sampler in by_type["KSampler"]:
        assert (sampler["steps"], sampler["cfg"], sampler["sampler_name"], sampler["scheduler"]) == (
            provenance.steps,
            provenance.cfg,
            "ddim",
            "simple",
        )
    return by_type


def test_quickstart_mini_uses_the_shipped_vectors_calibrated_setting(comfy_env, classes):
    """The mini's template steers with what dye_removal.safetensors records as calibrated, and
    samples as the mini was calibrated (20 steps, CFG 2, ddim on the trailing 'simple' schedule)."""
    prompt = ui_to_api(json.loads((REPO / "example_workflows" / "medsteer_quickstart_mini.json").read_text()), classes)
    by_type = check_steers_as_calibrated(comfy_env, prompt)
    assert by_type["LoadMedSteerMini"] == [{"denoiser": "MedSteer-mini (PixArt)"}]


def test_sd_template_loads_a_checkpoint_and_steers_the_unet_preset_by_name(comfy_env, classes):
    """The SD template: CheckpointLoaderSimple's MODEL, CLIP and VAE feed the pair, and its window,
    written by name, is the engine's UNet preset on SD1.x/2.x (checked on the full SD1.5 UNet)."""
    import comfy.ops
    import torch
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    prompt = ui_to_api(
        json.loads((REPO / "example_workflows" / "medsteer_counterfactual_pair_sd.json").read_text()), classes
    )
    by_type = {}
    for node_id, node in prompt.items():
        by_type.setdefault(node["class_type"], []).append((node_id, node["inputs"]))
    ((loader_id, _),) = by_type["CheckpointLoaderSimple"]
    ((steer_id, steer),) = by_type["ApplySSPSSteer"]
    assert steer["model"] == [loader_id, 0]
    assert {tuple(n["clip"]) for _, n in by_type["CLIPTextEncode"]} == {(loader_id, 1)}
    assert {tuple(n["vae"]) for _, n in by_type["VAEDecode"]} == {(loader_id, 2)}
    assert [n["model"] for _, n in by_type["GateHeatmap"]] == [[steer_id, 0]]
    sd15 = {
        "image_size": 32,
        "in_channels": 4,
        "out_channels": 4,
        "model_channels": 320,
        "num_res_blocks": [2] * 4,
        "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
        "channel_mult": [1, 2, 4, 4],
        "transformer_depth_middle": 1,
        "transformer_depth_output": [1] * 9 + [0] * 3,
        "context_dim": 768,
        "num_heads": 8,
        "use_spatial_transformer": True,
        "legacy": False,
        "use_linear_in_transformer": False,
    }
    with torch.device("meta"):
        unet = UNetModel(**sd15, device="meta", operations=comfy.ops.disable_weight_init)
    sites = comfy_env.core.find_sites(unet)
    window = sites.default_window
    assert sites.family == "sd1" and sites.resolve_layers(steer["layers"]) == window == (4, 10)
    assert (steer["layer_start"], steer["layer_end"]) == window
