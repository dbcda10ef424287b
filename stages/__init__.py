"""The pipeline's stages, one module each, all with the same signature:

    run(config: PipelineConfig, inputs: dict[str, Path], output_dir: Path) -> dict

``inputs`` maps each upstream stage to its artifact directory; the returned dict is recorded as
the stage's outputs in its ``manifest.json``.
"""
