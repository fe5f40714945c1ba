from guard_training.build import main

main()
