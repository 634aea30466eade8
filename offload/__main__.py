from offload._demo import main

main()
