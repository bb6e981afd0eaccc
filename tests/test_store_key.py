"""The teacher store's key: what changes a trained teacher changes the key; naming its parts does not."""

from hydra import compose, initialize_config_dir

from kdrun.cli import conf_dir
from kdrun.store import teacher_key


def keys(*override_lists):
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        return [teacher_key(compose("train", overrides=["teacher=cnn", *o]), 0) for o in override_lists]


def test_stage_names_and_head_path_leave_the_key_alone_but_the_architecture_does_not():
    plain, renamed, head, wider = keys([], ["~teacher.model.features", "+teacher.model.features={x: body}"],
                                       ["+teacher.model.head=head"], ["teacher.model.fc=128"])
    assert plain == renamed == head
    assert wider != plain
