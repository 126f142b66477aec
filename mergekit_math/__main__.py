from mergekit_math.cli import run

run()
