from finetune.export.command import main

main()
