"""One update schedule for the two-player objectives (objectives.base.UpdateSchedule): `critic_per_generator`
critic updates per generator update in f-distill, SMT/SMD, sCM + LADD and Lightning.

The recipes must step exactly the groups they stepped before the key was unified. The old schedules are
written out here from the code as it was (commit af01c23), not computed by the new code:

* fdistill, key `critic_steps` = C: the generator alone iff step % (C + 1) == C, else the critic alone:
  ["fake_score", "disc"], or ["fake_score"] without a discriminator (divergence reverse_kl, gan_weight 0 and
  r1_weight 0);
* smt / smd, key `score_steps` = S: the generator iff step < generator_warmup or step % S == S - 1, then
  ["student", "score"], else ["score"];
* scm_ladd (no key): ["student"] if step % 2 == 0 else ["disc"];
* lightning (no key): (k, j) = (stage, iteration in it); k < mse_stages: ["student"]; else ["student"] if
  j % 2 == 0 else ["disc"].
"""
import pytest
import torch
from onestep.objectives.base import CRITIC, GENERATOR, UpdateSchedule

from onestep.config import ConfigError, load_config, section_config
from onestep.registry import OBJECTIVES, load_builtin

#: every shipped recipe of a two-player objective, with the value of its old schedule key before the rename
#: (None: the objective had no key). A recipe of these objectives missing here fails the test.
OLD_RECIPES = {
    "digits_fdistill": ("critic_steps", 5),
    "digits_fdistill_reverse_kl": ("critic_steps", 5),
    "sd15_fdistill": ("critic_steps", 9),
    "sdxl_fdistill": ("critic_steps", 4),
    "digits_smd": ("score_steps", 5),
    "digits_smt": ("score_steps", 5),
    "imagenet64_smd": ("score_steps", 5),
    "digits_scm_ladd": (None, None),
    "digits_lightning": (None, None),
    "digits_lightning_4step": (None, None),
}
TWO_PLAYER = ("fdistill", "smt", "smd", "scm_ladd", "lightning")


def old_groups(name: str, opts: dict, old_value, step: int) -> list[str]:
    """The groups that stepped at `step` before the rename (the formulas of the module docstring)."""
    if name == "fdistill":
        c = old_value
        if step % (c + 1) == c:
            return ["student"]
        disc = opts["divergence"] != "reverse_kl" or opts["gan_weight"] > 0 or opts["r1_weight"] > 0
        return ["fake_score", "disc"] if disc else ["fake_score"]
    if name in ("smt", "smd"):
        s = old_value
        generator = step < opts["generator_warmup"] or step % s == s - 1
        return ["student", "score"] if generator else ["score"]
    if name == "scm_ladd":
        return ["student"] if step % 2 == 0 else ["disc"]
    if name == "lightning":
        start = 0
        for k, iters in enumerate(opts["stage_iters"]):
            if step < start + iters or k == len(opts["stage_iters"]) - 1:
                break
            start += iters
        j = step - start
        if k < opts["mse_stages"]:
            return ["student"]
        return ["student"] if j % 2 == 0 else ["disc"]
    raise AssertionError(name)


def _unchanged_options(cfg) -> dict:
    """The options the old formulas read besides the renamed key (their names and meanings did not change)."""
    return {f: getattr(cfg, f) for f in ("divergence", "gan_weight", "r1_weight", "generator_warmup", "stage_iters",
                                         "mse_stages") if hasattr(cfg, f)}


def _recipes():
    from onestep.config import find_config

    names = []
    for path in sorted(find_config("demo").parent.glob("*.yaml")):
        cfg = load_config(path)
        if cfg.objective["name"] in TWO_PLAYER:
            names.append(path.stem)
    return names


def test_every_two_player_recipe_is_pinned():
    assert sorted(_recipes()) == sorted(OLD_RECIPES)


@pytest.mark.parametrize("recipe", sorted(OLD_RECIPES))
def test_recipes_step_the_same_groups_as_before_the_rename(recipe):
    load_builtin()
    run = load_config(recipe)
    name = run.objective["name"]
    cls, cfg = section_config("objective", run.objective, OBJECTIVES)
    old_key, old_value = OLD_RECIPES[recipe]
    if old_key is not None:
        assert cfg.critic_per_generator == old_value   # the value converts unchanged (the error message says so)
    opts = _unchanged_options(cfg)
    steps = min(run.train.steps, 5000)                 # every step of the digits recipes (warm-ups, stage ends)
    old = [old_groups(name, opts, old_value, s) for s in range(steps)]
    new = [cls.scheduled_groups(cfg, s) for s in range(steps)]
    assert new == old
    assert {g for groups in old for g in groups} >= {"student"}


def _built(name, teacher, **options):
    from onestep.student import MLPAvgVelocity

    cls = OBJECTIVES.get(name)
    return cls(MLPAvgVelocity(2, hidden=16), teacher, cls.Config(**options))


@pytest.mark.parametrize("name,options,old_value", [
    ("fdistill", {"critic_per_generator": 3}, 3),
    ("fdistill", {"critic_per_generator": 2, "divergence": "reverse_kl", "gan_weight": 0.0}, 2),
    ("smt", {"critic_per_generator": 3, "generator_warmup": 4}, 3),
    ("smd", {"critic_per_generator": 2, "gan_weight": 0.0, "critic_gan_weight": 0.0}, 2),
    ("scm_ladd", {}, None),
    ("lightning", {"teacher_steps": 8, "stages": [4, 2, 1], "stage_iters": [3, 7, 6], "mse_stages": 1}, None),
])
def test_built_objectives_ask_the_same_schedule(gmm_teacher, name, options, old_value):
    """What the trainer asks (active_groups of a built objective) is the config's schedule, and the old one."""
    load_builtin()
    teacher = None if name == "smt" else gmm_teacher
    obj = _built(name, teacher, **options)
    opts = _unchanged_options(obj.cfg)
    for step in range(30):
        assert obj.active_groups(step) == old_groups(name, opts, old_value, step), step
        assert obj.active_groups(step) == type(obj).scheduled_groups(obj.cfg, step)
    assert set(obj.param_groups()) == {g for s in range(30) for g in obj.active_groups(s)}


@pytest.mark.parametrize("recipe,old_key,value", [("sd15_fdistill", "critic_steps", 9),
                                                  ("digits_smd", "score_steps", 5), ("digits_smt", "score_steps", 3)])
def test_old_schedule_keys_are_refused_in_one_line_with_the_conversion(tmp_path, recipe, old_key, value):
    meaning = {"critic_steps": "critic", "score_steps": "score-net"}[old_key]
    expect = (f"objective.{old_key} is no longer a key: use objective.critic_per_generator={value} "
              f"(the same number: {meaning} updates per generator update)")
    with pytest.raises(ConfigError) as e:
        load_config(recipe, [f"objective.{old_key}={value}"])
    assert str(e.value) == expect
    # the same in a user's YAML file
    path = tmp_path / "old.yaml"
    path.write_text(f"name: old\nobjective:\n  name: {load_config(recipe).objective['name']}\n  {old_key}: {value}\n",
                    encoding="utf-8")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(e.value) == expect
    # following the message gives the old schedule
    run = load_config(recipe, [f"objective.critic_per_generator={value}"])
    cls, cfg = section_config("objective", run.objective, OBJECTIVES)
    opts = _unchanged_options(cfg)
    assert [cls.scheduled_groups(cfg, s) for s in range(40)] == \
        [old_groups(run.objective["name"], opts, value, s) for s in range(40)]


@pytest.mark.parametrize("recipe", ["digits_fdistill", "digits_smt", "digits_scm_ladd", "digits_lightning"])
@pytest.mark.parametrize("bad", ["0", "-1", "1.5"])
def test_critic_per_generator_must_be_a_positive_integer(recipe, bad):
    with pytest.raises(ConfigError, match="critic_per_generator") as e:
        load_config(recipe, [f"objective.critic_per_generator={bad}"])
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("n", [1, 2, 5, 9])
@pytest.mark.parametrize("joint,generator_first", [(False, False), (False, True), (True, False)])
def test_n_critic_updates_per_generator_update_in_every_mode(n, joint, generator_first):
    schedule = UpdateSchedule(n, joint=joint, generator_first=generator_first)
    cycle = n if joint else n + 1
    players = [schedule.players(s) for s in range(cycle * 7)]
    assert sum(GENERATOR in p for p in players) == 7 and sum(CRITIC in p for p in players) == 7 * n
    first = players[0]
    assert (GENERATOR in first) == (generator_first or (joint and n == 1))
    assert all(p for p in players)                                  # someone updates at every step
    assert joint or all(len(p) == 1 for p in players)               # alternating: never both


def test_warmup_updates_the_generator_every_step_then_the_cycles_from_step_zero():
    joint = UpdateSchedule(5, joint=True, warmup=3)
    assert [joint.players(s) for s in range(10)] == [(GENERATOR, CRITIC)] * 3 + [(CRITIC,), (GENERATOR, CRITIC)] + \
        [(CRITIC,)] * 4 + [(GENERATOR, CRITIC)]
    alternating = UpdateSchedule(2, warmup=2)
    assert [alternating.players(s) for s in range(6)] == [(GENERATOR,)] * 3 + [(CRITIC,)] * 2 + [(GENERATOR,)]


def test_lightning_restarts_the_cycle_at_each_adversarial_stage(gmm_teacher):
    from onestep.objectives.lightning import Lightning, LightningConfig

    cfg = LightningConfig(teacher_steps=8, stages=[4, 2, 1], stage_iters=[2, 5, 4], mse_stages=1,
                          critic_per_generator=2)
    groups = [Lightning.scheduled_groups(cfg, s) for s in range(11)]
    g, d = ["student"], ["disc"]
    assert groups == [g, g] + [g, d, d, g, d] + [g, d, d, g]
    torch.manual_seed(0)
    obj = _built("lightning", gmm_teacher, teacher_steps=8, stages=[4, 2, 1], stage_iters=[2, 5, 4], mse_stages=1,
                 critic_per_generator=2)
    x = gmm_teacher.mixture.sample(8, generator=torch.Generator().manual_seed(0))[0]
    obj.generator = torch.Generator().manual_seed(0)
    for step in (2, 3, 5):   # the loss trains the player the schedule names
        out = obj.loss({"x": x}, step)
        assert [k for k in out if not k.startswith("log/")] == groups[step]


def test_a_run_saved_with_an_old_key_still_loads(tmp_path):
    """A run folder written before the rename keeps working for export and eval: its own config.yaml's old key is
    read as critic_per_generator with the same number (and a warning); a user's config with it is refused."""
    import yaml

    from onestep.config import to_yaml

    cfg = load_config("digits_fdistill", [f"output_dir={tmp_path}"])
    saved = yaml.safe_load(to_yaml(cfg))
    old = saved["objective"].pop("critic_per_generator") + 2
    saved["objective"]["critic_steps"] = old
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(saved))
    with pytest.warns(UserWarning, match=f"objective.critic_steps read as objective.critic_per_generator={old} "):
        migrated = load_config(path, saved_run=True)
    assert migrated.objective["critic_per_generator"] == old and "critic_steps" not in migrated.objective
    with pytest.raises(ConfigError, match="critic_steps is no longer a key"):
        load_config(path)
