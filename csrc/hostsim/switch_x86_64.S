// gptoss hostsim: fiber context switch (x86-64 System V).
//   void gptoss_hs_switch(void** save_sp, void* load_sp)
// Saves the callee-saved registers, MXCSR and the x87 control word on the current stack, stores
// the stack pointer in *save_sp, loads load_sp and restores the same from there.
    .text
    .globl gptoss_hs_switch
    .hidden gptoss_hs_switch
    .type gptoss_hs_switch, @function
gptoss_hs_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size gptoss_hs_switch, .-gptoss_hs_switch
    .section .note.GNU-stack,"",@progbits
