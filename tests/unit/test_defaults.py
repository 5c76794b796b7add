"""The repository's top-level serving.properties documents the defaults: it must say what the code does."""
from serving.config import ModelConfig, build_config, read_properties
from tests.server import ROOT


def test_top_level_serving_properties_equals_the_code_defaults(tmp_path):
    documented = build_config(read_properties(ROOT / "serving.properties"), tmp_path, "m", source="defaults")
    defaults = ModelConfig(name="m", model_dir=tmp_path)
    assert documented.model_dump(exclude={"options"}) == defaults.model_dump(exclude={"options"})
