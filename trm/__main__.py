from trm.train import main

main()
