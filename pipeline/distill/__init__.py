"""Distillation: a student generator from a teacher, by one of several methods.

Each method is one module of this package behind the interface in `method.py`; METHODS names them for
the config (`distill.method`) without importing torch. Adding a method is one new module and one entry
here. `student.py` is what the training loop (pipeline/trainer.py) trains: a method and the student
it makes (G's weights, or their EMA); `validation.py` reads the validations back in the stage's driver.
"""

METHODS: dict[str, str] = {  # distill.method -> "module:class"
    "dmd": "pipeline.distill.dmd:DMD",  # DM loss + LPIPS regression onto the teacher's pairs
    "dmd2": "pipeline.distill.dmd2:DMD2",  # DM loss + a GAN head on the fake score, trained on real images
}
