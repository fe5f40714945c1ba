from models.cli import main

main()
