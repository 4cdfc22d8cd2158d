from tuneserve.cli import main

main()
