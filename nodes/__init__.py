"""ComfyUI nodes of MedSteer (V3 schema). Imported only inside ComfyUI."""
