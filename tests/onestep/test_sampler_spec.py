"""onestep.sampling.SamplerSpec: how a student samples, as data that survives JSON and sets a student."""
import json

import pytest
import torch

from onestep.paths import DiscreteVPSchedule
from onestep.sampling import SamplerSpec
from onestep.student import MLPAvgVelocity
from onestep.trigflow import consistency_times


def test_json_round_trip_is_exact():
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    alphas = torch.cumprod(1 - betas, 0)
    for spec in (SamplerSpec(), SamplerSpec(kind="consistency", grid="consistency", consistency_data_std=0.5,
                                            consistency_intermediate=1.1, interval_scale=1.0, time_scale=1000.0),
                 SamplerSpec(grid="trailing", alphas_cumprod=tuple(alphas.tolist()), prediction_type="sample")):
        assert SamplerSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


@pytest.mark.parametrize("values, message", [
    ({"kind": "euler"}, "sampler kind"), ({"grid": "karras"}, "sampler grid"),
    ({"grid": "trailing"}, "needs alphas_cumprod"), ({"steps": 2}, "unknown sampler spec keys: steps")])
def test_bad_specs_are_refused_in_one_line(values, message):
    with pytest.raises(ValueError, match=message):
        SamplerSpec.from_dict(values)


def test_a_spec_sets_what_the_student_samples():
    """A consistency spec gives the consistency_times grid; a trailing spec the schedule's trailing grid; the
    student's own spec afterwards is the one it was given."""
    torch.manual_seed(0)
    student = MLPAvgVelocity(2, hidden=16).double()
    assert student.sampler_spec() == SamplerSpec(interval_scale=1000.0, time_scale=1000.0)
    spec = SamplerSpec(kind="consistency", grid="consistency", consistency_data_std=0.5, consistency_intermediate=1.1,
                       interval_scale=1000.0, time_scale=1000.0)
    student.set_sampler_spec(spec)
    assert student.sampler_spec() == spec
    assert torch.equal(student.default_times(2), torch.tensor(consistency_times(2, 0.5, 1.1), dtype=torch.float64))
    alphas = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 50, dtype=torch.float64), 0)
    trailing = SamplerSpec(grid="trailing", alphas_cumprod=tuple(alphas.tolist()), interval_scale=1000.0,
                           time_scale=1000.0)
    student.set_sampler_spec(trailing)
    assert student.sampler == "avg_velocity" and student.sampler_spec() == trailing
    assert torch.equal(student.default_times(3), DiscreteVPSchedule(alphas).trailing_grid(3))
