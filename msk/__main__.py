from msk.core.cli import main

main()
