from grain.cli import main

main()
