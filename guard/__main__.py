from guard.build import main

main()
