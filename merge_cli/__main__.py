from merge_cli.cli import main

main()
