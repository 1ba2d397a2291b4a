"""The typed config base (ultrasound.config.Settings) as the three job configs use it."""
from __future__ import annotations

import pytest

from ultrasound.active.sim_config import SimulationConfig
from ultrasound.msml import MSMLConfig
from ultrasound.uscl import USCLConfig


@pytest.mark.parametrize("model, extra", [(USCLConfig, {}), (MSMLConfig, {"findings": "a,b"}),
                                          (SimulationConfig, {})])
def test_text_from_yaml_or_set_converts_and_a_switch_is_not_a_number(model, extra):
    int_key = {"USCL": "epochs", "MSML": "epochs", "simulation": "seeds"}[model.what]
    float_key = {"USCL": "lr", "MSML": "lr", "simulation": "per_round"}[model.what]
    config = model.parse({**extra, int_key: "1e1", float_key: "3e-4"})
    assert getattr(config, int_key) == 10 and isinstance(getattr(config, int_key), int)
    assert getattr(config, float_key) == 0.0003
    with pytest.raises(ValueError, match=rf"^{model.what} config key '{int_key}': needs a number, not a switch, got True$"):
        model.parse({**extra, int_key: True})
    with pytest.raises(ValueError, match=rf"^{model.what} config key '{int_key}' needs an int, got '2.5'$"):
        model.parse({**extra, int_key: "2.5"})
    with pytest.raises(ValueError, match=rf"^unknown {model.what} config key\(s\) \['{float_key}x'\] "
                                         rf"\(did you mean '{float_key}'\?\); valid keys: \["):
        model.parse({**extra, f"{float_key}x": 1})


def test_replace_validates_and_to_dict_round_trips():
    config = SimulationConfig.parse({"strategies": "tsal, random", "max_machine_per_round": "none"})
    assert config.strategies == ("tsal", "random") and config.max_machine_per_round is None
    assert config.to_dict()["strategies"] == ["tsal", "random"]
    assert SimulationConfig.parse(config.to_dict()) == config
    assert config.replace(rounds=2).rounds == 2 and config.rounds == 9
    with pytest.raises(ValueError, match="rounds must be >= 0"):
        config.replace(rounds=-1)
    assert SimulationConfig.default_of("head_l2") == 3e-3
    assert hash(USCLConfig(seed=1)) == hash(USCLConfig.parse({"seed": "1"}))
