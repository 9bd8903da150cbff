"""Built-in chat templates, by the name `data.chat_template` and `prompt_style` use.

Plain text with no imports: finetune.models.tiny gives its tokenizer the ChatML template without
loading the tokenization code (numpy, and transformers when rendering).
"""

# prompt_style=chatml: ChatML for tokenizers without a chat template of their own (the tiny one too).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
NAMED_TEMPLATES = {"chatml": CHATML_TEMPLATE}
