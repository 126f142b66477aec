"""The one exception type the CLI turns into a one-line message and exit code 2."""


class UserError(Exception):
    """A problem in what the user asked for (recipe, paths, checkpoints), not a bug.

    The message is one line that names the place: a YAML path such as
    ``models[1].parameters.density`` or a file and tensor name.
    """
