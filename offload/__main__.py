from offload.demo.command import main

main()
