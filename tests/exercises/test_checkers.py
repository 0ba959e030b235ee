"""What every exercise checker shares."""


def test_every_checker_turns_a_crash_into_feedback():
    """Each chapter's check_exercise_N is wrapped in qlora_lab.exercises.checker."""
    import importlib
    import pkgutil

    import qlora_lab.exercises as exercises

    bare = []
    for info in pkgutil.iter_modules(exercises.__path__):
        module = importlib.import_module(f"qlora_lab.exercises.{info.name}")
        for name in dir(module):
            if name.startswith("check_exercise_") and not hasattr(getattr(module, name), "__wrapped__"):
                bare.append(f"{info.name}.{name}")
    assert not bare, f"decorate with @checker(N): {bare}"
