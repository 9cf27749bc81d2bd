# A native build must run on the machine that built it. llama.cpp's CPU backend is compiled with
# -march=native by default, which enables whatever the compiler believes this CPU has; two ways
# that has gone wrong for users:
#   - a hypervisor or OS that switched a feature off (the binary dies with SIGILL);
#   - AMX on Sapphire Rapids and later with GCC 12, whose _tile_loadconfig intrinsic claims to
#     read 8 bytes of the 64-byte tile configuration, so the optimiser drops the stores that
#     llama.cpp's AMX kernels make and every batch of >= 2 tokens crashes.
# These checks run at configure time, before llama.cpp is added, and fall back to a build that
# works (portable flags, or native without AMX), saying why.
#
# DOLA_AMX: AUTO (default: keep AMX where the checks pass), OFF (never), ON (skip the checks).

include_guard(GLOBAL)

set(DOLA_AMX "AUTO" CACHE STRING "Use llama.cpp's AMX kernels: AUTO (when they work here), ON, OFF")
set_property(CACHE DOLA_AMX PROPERTY STRINGS AUTO ON OFF)

set(_dola_probes "${CMAKE_CURRENT_LIST_DIR}/probes")

function(_dola_cpu_flags out)
    if(GGML_NATIVE)
        set(flags -march=native)
    else()
        set(flags "")
        foreach(feature AMX_TILE AMX_INT8 AVX512 AVX512_VNNI)
            if(GGML_${feature})
                string(TOLOWER "${feature}" f)
                string(REPLACE "_" "-" f "${f}")
                if(f STREQUAL "avx512")
                    set(f "avx512f")
                elseif(f STREQUAL "avx512-vnni")
                    set(f "avx512vnni")
                endif()
                list(APPEND flags "-m${f}")
            endif()
        endforeach()
    endif()
    set(${out} "${flags}" PARENT_SCOPE)
endfunction()

function(_dola_defines_amx flags out)
    execute_process(
        COMMAND ${CMAKE_CXX_COMPILER} ${flags} -dM -E -x c++ -
        INPUT_FILE /dev/null
        OUTPUT_VARIABLE macros ERROR_QUIET RESULT_VARIABLE rc)
    # llama.cpp's CPU backend compiles its AMX kernels when both are defined
    if(rc EQUAL 0 AND macros MATCHES "__AMX_INT8__" AND macros MATCHES "__AVX512VNNI__")
        set(${out} TRUE PARENT_SCOPE)
    else()
        set(${out} FALSE PARENT_SCOPE)
    endif()
endfunction()

# Returns in `out` an empty string when AMX code built with `flags` is safe here, else the reason.
function(_dola_amx_problem flags out)
    # 1. The compiler keeps the tile configuration it is given (checkable without AMX hardware).
    execute_process(
        COMMAND ${CMAKE_CXX_COMPILER} ${flags} -O2 -S -o - "${_dola_probes}/amx_tilecfg.cpp"
        OUTPUT_VARIABLE asm ERROR_VARIABLE err RESULT_VARIABLE rc)
    if(NOT rc EQUAL 0)
        set(${out} "the AMX probe does not compile: ${err}" PARENT_SCOPE)
        return()
    endif()
    if(NOT asm MATCHES "%(dil|edi|rdi)")
        set(${out} "${CMAKE_CXX_COMPILER_ID} ${CMAKE_CXX_COMPILER_VERSION}'s _tile_loadconfig drops the tile configuration (GCC < 13 bug); llama.cpp's AMX kernels would crash" PARENT_SCOPE)
        return()
    endif()
    # 2. Where this CPU has AMX, a tile multiply on two threads runs and is right.
    if(CMAKE_CROSSCOMPILING)
        set(${out} "" PARENT_SCOPE)
        return()
    endif()
    try_run(run_rc compile_ok "${CMAKE_BINARY_DIR}/dola_probes/amx_runs" "${_dola_probes}/amx_runs.cpp"
        COMPILE_DEFINITIONS ${flags} -O2
        LINK_OPTIONS -pthread
        CXX_STANDARD 17
        COMPILE_OUTPUT_VARIABLE compile_out RUN_OUTPUT_VARIABLE run_out)
    if(NOT compile_ok)
        set(${out} "the AMX run probe does not compile" PARENT_SCOPE)
    elseif(run_rc STREQUAL "77" OR run_rc EQUAL 0)
        set(${out} "" PARENT_SCOPE)  # works, or this CPU has no AMX to run it on
    else()
        string(STRIP "${run_out}" run_out)
        set(${out} "an AMX tile multiply failed on this machine (exit ${run_rc}${run_out})" PARENT_SCOPE)
    endif()
endfunction()

function(dola_check_native_build)
    set(DOLA_AMX_NOTE "not enabled by the build's CPU flags" PARENT_SCOPE)
    if(MSVC OR NOT CMAKE_CXX_COMPILER_ID MATCHES "GNU|Clang")
        return()
    endif()
    if(GGML_NATIVE AND NOT CMAKE_CROSSCOMPILING)
        try_run(run_rc compile_ok "${CMAKE_BINARY_DIR}/dola_probes/native_runs" "${_dola_probes}/native_runs.c"
            COMPILE_DEFINITIONS -march=native -O2
            COMPILE_OUTPUT_VARIABLE compile_out)
        if(compile_ok AND NOT run_rc EQUAL 0)
            message(WARNING "dola-cpp: a program built with -march=native does not run on this machine "
                            "(${run_rc}); building llama.cpp with portable flags (GGML_NATIVE=OFF)")
            set(GGML_NATIVE OFF CACHE BOOL "" FORCE)
        endif()
    endif()

    if(NOT CMAKE_SYSTEM_PROCESSOR MATCHES "^(x86_64|AMD64|amd64)$")
        return()
    endif()
    _dola_cpu_flags(flags)
    _dola_defines_amx("${flags}" has_amx)
    if(NOT has_amx)
        message(STATUS "dola-cpp: AMX kernels not enabled by these CPU flags")
        set(DOLA_AMX_NOTE "not enabled by the build's CPU flags" PARENT_SCOPE)
        return()
    endif()
    set(problem "")
    if(DOLA_AMX STREQUAL "OFF")
        set(problem "DOLA_AMX=OFF")
    elseif(NOT DOLA_AMX STREQUAL "ON")
        _dola_amx_problem("${flags}" problem)
    endif()
    if(problem)
        message(WARNING "dola-cpp: building llama.cpp without AMX: ${problem}")
        if(GGML_NATIVE)
            # explicit -mno-* flags win over -march=native whatever their order on the command line
            add_compile_options(-mno-amx-tile -mno-amx-int8 -mno-amx-bf16)
        else()
            foreach(feature AMX_TILE AMX_INT8 AMX_BF16)
                set(GGML_${feature} OFF CACHE BOOL "" FORCE)
            endforeach()
        endif()
        set(DOLA_AMX_NOTE "disabled at build: ${problem}" PARENT_SCOPE)
    else()
        message(STATUS "dola-cpp: llama.cpp's AMX kernels enabled (checked: tile configuration kept, tile multiply runs)")
        set(DOLA_AMX_NOTE "enabled (DOLA_AMX=${DOLA_AMX})" PARENT_SCOPE)
    endif()
endfunction()
