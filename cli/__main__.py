from xm.cli.app import main

main()
