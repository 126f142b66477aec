from mergekit_math.cli import main

main()
