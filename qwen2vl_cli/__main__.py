from qwen2vl_cli.cli import main

main()
